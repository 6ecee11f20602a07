"""Recoverable Compression (``recoverable``): the LOF counts against scikit-learn's values and a written-out LOF,
the three stages (visual outliers, question recovery, merge of the rest) against a plain loop on fixed tensors, the
budget as an upper bound, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pre_llm import _lof_count

import mmprune
from mmprune.media import MediaItem, Segment
from mmprune.methods.recoverable import REFERENCE_TEXT_WEIGHT, lof_outliers, question_similarity
from mmprune.prompt import PromptText


def with_prompt(tokens: MediaItem, question: torch.Tensor) -> MediaItem:
    """``question`` ``(I, D)`` as the item's instruction embeddings (every text token the instruction)."""
    n = question.shape[0]
    tokens.prompt = PromptText(ids=torch.arange(n), embeds=question, positions=torch.arange(n),
                               instruction=torch.ones(n, dtype=torch.bool))
    return tokens


def item(seed: int = 3, n: int = 48, rows: int = 6, cols: int = 8, question: torch.Tensor | None = None):
    """48 tokens: heavy-tailed [CLS] attention, LLM embeddings with a small first coordinate except at tokens 5, 22
    and 44 (which the default question, along that coordinate, singles out), random pre-projector features and
    keys, and an affine map standing in for the projector."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.softmax(torch.randn(n, generator=g) * 2, 0)
    embeds = torch.randn(n, 6, generator=g)
    embeds[:, 0] *= 0.1
    for p in (5, 22, 44):
        embeds[p, 0] = 3 + torch.rand(1, generator=g).item()
    features, keys = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
    lazy = {"last_layer_cls_attention": lambda: attention, "last_layer_keys": lambda: keys,
            "vision_features": lambda: features}
    tokens = MediaItem(embeds, [Segment(0, rows, cols)], family="llava", lazy=lazy, project=lambda v: 2 * v + 1)
    if question is None:
        question = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 0.2, 0, 0, 0, 0]])
    return with_prompt(tokens, question), attention, embeds, features, keys


def reference(a, embeds, question, features, keys, k, project, visual_n=20, text_n=20, rest_n=10, neighbours=32,
              weight=REFERENCE_TEXT_WEIGHT):
    """The rule written out: slots and output embeddings, in output order, and the per-stage counts."""
    a, x, keys = a.double().numpy(), features.double(), keys.double().numpy()
    e = embeds.double().numpy()
    q = question.double().numpy()
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).mean(axis=0)
    t = e @ q / (np.linalg.norm(e, axis=1) * np.linalg.norm(q))
    n = len(a)
    visual = sorted(range(n), key=lambda i: (-a[i], i))[:_lof_count(a, visual_n)]
    lowered = np.array([t.min() if i in visual else t[i] for i in range(n)])
    n_text = (n - len(visual)) * _lof_count(lowered, text_n) // n
    recovered = sorted((i for i in range(n) if i not in visual), key=lambda i: (-t[i], i))[:n_text]
    counts = [len(visual), len(recovered)]
    visual = visual[:k]
    recovered = recovered[:k - len(visual)]
    main = sorted(visual + recovered)
    rest = [i for i in range(n) if i not in main]
    room = k - len(main)
    outliers = _lof_count(a[rest], rest_n)
    centres = sorted(rest, key=lambda i: (-a[i], i))[:min(outliers, room - 1) if room >= 2 else 0]
    counts.append(len(centres))
    if not centres:
        return main, embeds[main].double(), counts
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    merged = []
    for c in centres:
        pool = [j for j in rest if j != c]
        score = {j: float(kn[c] @ kn[j]) + weight * t[j] for j in pool}
        best = sorted(pool, key=lambda j: -score[j])[:neighbours]
        merged.append(x[c] + sum(a[j] * x[j] for j in best))
    others = [j for j in rest if j not in centres]
    merged.append(sum(a[j] * x[j] for j in others))
    slots = main + centres + [max(others, key=lambda j: a[j])]
    out = torch.cat([embeds[main].double(), project(torch.stack(merged))])
    return slots, out, counts


def test_lof_counts_equal_scikit_learn_and_the_written_out_definition():
    # scikit-learn 1.9.1 LocalOutlierFactor(n_neighbors, contamination="auto").fit_predict counts, computed once
    g = torch.Generator().manual_seed(0)
    v = torch.rand(577, generator=g) ** 8
    assert lof_outliers(v, 20) == 68 and lof_outliers(v, 10) == 24
    spread = torch.tensor([0.1, 0.11, 0.12, 0.13, 0.5])
    assert [lof_outliers(spread, k) for k in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert lof_outliers(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 30]), 3) == 1
    assert lof_outliers(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 30]), 20) == 0  # 8 neighbours: 30 is not local
    assert lof_outliers(torch.tensor([0.3]), 20) == 0 and lof_outliers(torch.tensor([]), 20) == 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        w = torch.softmax(torch.randn(60, generator=g) * 3, 0)
        w[:seed * 4] = w.min()  # a block of ties, as step 2's lowered similarities
        for k in (3, 10, 20):
            assert lof_outliers(w, k) == _lof_count(w.numpy(), k)


def test_question_similarity_is_the_cosine_to_the_mean_normalised_instruction():
    embeds = torch.tensor([[1.0, 0], [0, 2], [1, 1]])
    question = torch.tensor([[3.0, 0], [0, 1]])  # normalised: (1, 0), (0, 1); mean (0.5, 0.5)
    torch.testing.assert_close(question_similarity(embeds, question),
                               torch.tensor([2 ** -0.5, 2 ** -0.5, 1.0]))


def test_the_three_stages_equal_the_rule_on_fixed_tensors():
    """Seed 3: 15 visual outliers, 2 tokens recovered by the question, 3 merge centres and the extra token."""
    tokens, a, embeds, features, keys = item()
    selection = mmprune.get("recoverable", keep=0.5).prune_image(tokens)
    slots, out, counts = reference(a, embeds, tokens.prompt.instruction_embeds, features, keys, 24,
                                   lambda v: 2 * v + 1)
    assert counts == [15, 2, 3]
    assert selection.slots.tolist() == slots
    torch.testing.assert_close(selection.embeds.double(), out, rtol=1e-5, atol=1e-6)
    assert selection.merged == 4
    assert ("15 of 48 tokens LOF outliers of [CLS] attention; 2 recovered by question similarity"
            in selection.note)


def test_the_recovered_tokens_follow_the_question():
    """Tokens 5, 22 and 44 stand out along the first coordinate: a question along it recovers them (those the
    visual stage did not keep already); a question along another coordinate recovers others."""
    tokens, a, embeds, features, keys = item(seed=1)
    kept = mmprune.get("recoverable", keep=0.5).prune_image(tokens)
    visual = torch.argsort(a, descending=True)[:lof_outliers(a, 20)].tolist()
    assert {5, 22, 44} <= set(kept.slots.tolist()) and not {5, 22, 44} <= set(visual)
    other = torch.tensor([[0.0, 0, 1, 0, 0, 0]])
    moved = mmprune.get("recoverable", keep=0.5).prune_image(with_prompt(item(seed=1)[0], other))
    slots, out, _ = reference(a, embeds, other, features, keys, 24, lambda v: 2 * v + 1)
    assert moved.slots.tolist() == slots and moved.slots.tolist() != kept.slots.tolist()


def test_the_text_weight_steers_the_merge_neighbours():
    tokens, a, embeds, features, keys = item()
    plain = mmprune.get("recoverable", keep=0.5, text_weight=0.0, merge_neighbours=4).prune_image(tokens)
    slots, out, _ = reference(a, embeds, tokens.prompt.instruction_embeds, features, keys, 24,
                              lambda v: 2 * v + 1, neighbours=4, weight=0.0)
    assert plain.slots.tolist() == slots
    torch.testing.assert_close(plain.embeds.double(), out, rtol=1e-5, atol=1e-6)
    weighted = mmprune.get("recoverable", keep=0.5, merge_neighbours=4).prune_image(tokens)
    assert weighted.slots.tolist() == plain.slots.tolist()
    assert not torch.allclose(weighted.embeds[-4:-1], plain.embeds[-4:-1])  # same centres, other neighbours


def test_keep_is_an_upper_bound_filled_visual_then_recovered_then_centres():
    tokens, a, embeds, features, keys = item()
    for k in (10, 16, 17, 18, 19):  # 15 visual, 2 recovered, 3 centres + the extra token
        selection = mmprune.get("recoverable", keep=k).prune_image(tokens)
        slots, out, counts = reference(a, embeds, tokens.prompt.instruction_embeds, features, keys, k,
                                       lambda v: 2 * v + 1)
        assert selection.slots.tolist() == slots and selection.count <= k
        torch.testing.assert_close(selection.embeds.double() if selection.embeds is not None else
                                   embeds[selection.slots].double(), out, rtol=1e-5, atol=1e-6)
        assert counts == {10: [15, 2, 0], 16: [15, 2, 0], 17: [15, 2, 0], 18: [15, 2, 0], 19: [15, 2, 1]}[k]
    assert "capped at 10 by keep=10" in mmprune.get("recoverable", keep=10).prune_image(tokens).note


def test_flat_scores_keep_the_token_of_highest_attention():
    """Two tiers of equal attention and a question no token leans to: no outlier anywhere (every token has exact
    duplicates nearer than the other tier); the code would pass no token. The first of the higher tier stays."""
    n = 16
    attention = torch.full((n,), 1 / n)
    attention[1::2] += 1e-3
    lazy = {"last_layer_cls_attention": lambda: attention, "last_layer_keys": lambda: torch.ones(n, 2),
            "vision_features": lambda: torch.ones(n, 3)}
    tokens = with_prompt(MediaItem(torch.ones(n, 3), [Segment(0, 4, 4)], family="llava", lazy=lazy,
                                   project=lambda v: v), torch.ones(1, 3))
    selection = mmprune.get("recoverable", keep=8).prune_image(tokens)
    assert selection.slots.tolist() == [1] and selection.embeds is None
    assert "no token selected: the highest [CLS] attention kept" in selection.note


def test_newline_tokens_are_never_counted_kept_nor_merged():
    """A LLaVA-NeXT-like layout (each of 6 rows ends with a newline): the selection equals the rule on the 48
    patches alone, mapped back to their token indices."""
    tokens, a, embeds, features, keys = item()
    segment = Segment(0, 6, 8, newline=True)
    patches = segment.patch_indices().reshape(-1)
    total = segment.size

    def spread(values, fill=0.0):
        out = torch.full((total, *values.shape[1:]), fill)
        out[patches] = values
        return out

    wide_a, wide_keys, wide_features = spread(a, 1.0), spread(keys, 1.0), spread(features, 5.0)
    lazy = {"last_layer_cls_attention": lambda: wide_a, "last_layer_keys": lambda: wide_keys,
            "vision_features": lambda: wide_features}
    wide = with_prompt(MediaItem(spread(embeds, 9.0), [segment], family="llava-next", lazy=lazy,
                                 project=lambda v: 2 * v + 1), tokens.prompt.instruction_embeds)
    selection = mmprune.get("recoverable", keep=24).prune_image(wide)
    slots, out, _ = reference(a, embeds, tokens.prompt.instruction_embeds, features, keys, 24, lambda v: 2 * v + 1)
    assert selection.slots.tolist() == patches[slots].tolist()
    torch.testing.assert_close(selection.embeds.double(), out, rtol=1e-5, atol=1e-6)


def test_without_a_prompt_the_method_says_so():
    tokens = item()[0]
    tokens.prompt = None
    with pytest.raises(RuntimeError, match="recoverable reads the prompt, but this item carries none"):
        mmprune.get("recoverable").prune_image(tokens)


def test_the_class_declares_what_the_engine_needs():
    cls = mmprune.METHODS["recoverable"]
    assert cls.reads_prompt and cls.variable_counts and cls.keep_means.startswith("most visual tokens")
    assert set(cls.encoder_fields) == {"last_layer_cls_attention", "last_layer_keys"}


@pytest.mark.parametrize("field, value, allowed", [
    ("visual_lof_neighbours", 0, "an int >= 1"), ("text_lof_neighbours", 2.5, "an int >= 1"),
    ("rest_lof_neighbours", -1, "an int >= 1"), ("merge_neighbours", 0, "an int >= 1"),
    ("text_weight", -0.5, r"a number in \[0, inf\]"), ("text_weight", "high", r"a number in \[0"),
])
def test_bad_fields_fail_at_get_naming_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"recoverable: {field}={value!r} is not valid: expected {allowed}"):
        mmprune.get("recoverable", **{field: value})


def test_merge_reads_unmerged_features_and_unnormalised_attention():
    """Two centres that are each other's neighbour: each adds the other's original features (not the merged
    ones), weighted by the raw attention."""
    tokens, a, embeds, features, keys = item()
    selection = mmprune.get("recoverable", keep=0.5, merge_neighbours=47).prune_image(tokens)
    slots, out, counts = reference(a, embeds, tokens.prompt.instruction_embeds, features, keys, 24,
                                   lambda v: 2 * v + 1, neighbours=47)
    # with every other token of the rest as a neighbour, each centre is x_c + sum_{j in rest, j != c} a_j x_j
    rest = [i for i in range(48) if i not in slots[:17]]
    for row, c in enumerate(slots[17:20]):
        expected = features[c].double() + sum(a[j].double() * features[j].double() for j in rest if j != c)
        torch.testing.assert_close(selection.embeds[17 + row].double(), 2 * expected + 1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(selection.embeds.double(), out, rtol=1e-5, atol=1e-5)
