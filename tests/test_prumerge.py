"""LLaVA-PruMerge and PruMerge+: the IQR count, the key-kNN merge, the uniform samples, keep as an upper bound, and
the last-layer [CLS] attention the LLaVA adapters capture for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_pre_llm import ONE_IMAGE, _eager_llava_vision

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.prumerge import iqr_outliers, sample_step, uniform_positions


def reference_merge(x, keys, a, kept, neighbours=32):
    """The merge as PruMerge's code loops it: for kept token i, the candidates are the other kept tokens (in output
    order) then the pruned ones (ascending); its ``neighbours`` most key-cosine-similar candidates j add a_j x_j
    (unnormalised) to x_i; one extra token sums a_j x_j over the pruned tokens."""
    x, keys, a = x.double(), keys.double(), a.double()
    pruned = [j for j in range(len(x)) if j not in kept]
    kn = keys / keys.norm(dim=-1, keepdim=True)
    out = []
    for i in kept:
        rest = [j for j in kept if j != i] + pruned
        sims = [float(kn[i] @ kn[j]) for j in rest]
        best = sorted(range(len(rest)), key=lambda r: -sims[r])[:neighbours]
        out.append(x[i] + sum(a[rest[r]] * x[rest[r]] for r in best))
    out.append(sum(a[j] * x[j] for j in pruned))
    return torch.stack(out)


def item(attention, rows, cols, seed=0, dim=6):
    """A hand-built image: ``rows x cols`` tokens with random features and keys, the given last-layer [CLS]
    attention, and an affine map standing in for the projector."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    features, keys = torch.randn(n, dim, generator=g), torch.randn(n, 5, generator=g)
    lazy = {"last_layer_cls_attention": lambda: attention, "last_layer_keys": lambda: keys,
            "vision_features": lambda: features}
    tokens = MediaItem(torch.zeros(n, dim), [Segment(0, rows, cols)], family="test", lazy=lazy,
                       project=lambda v: 2 * v + 1)
    return tokens, features, keys


def spiked(n, spikes, seed=1):
    """Attention near 1/n everywhere, far above it at ``spikes`` (in decreasing order of height)."""
    g = torch.Generator().manual_seed(seed)
    a = (1 + 0.01 * torch.rand(n, generator=g)) / n
    for rank, position in enumerate(spikes):
        a[position] = 0.5 / (rank + 1)
    return a


def test_the_iqr_count_is_the_values_strictly_above_q3_plus_one_and_a_half_iqr():
    values = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 30])  # Q1 = 3, Q3 = 7 (exact positions), IQR = 4
    assert iqr_outliers(values) == 1  # above 13: 30
    assert iqr_outliers(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 13])) == 0  # 13 is the bound itself
    assert iqr_outliers(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 13.01])) == 1
    assert iqr_outliers(values, factor=0.25) == 1 and iqr_outliers(values, factor=0.2) == 2  # bounds 8, 7.8
    assert iqr_outliers(torch.full((16,), 1 / 16)) == 0
    g = torch.Generator().manual_seed(0)
    v = torch.rand(577, generator=g) ** 8
    q1, q3 = np.percentile(v.numpy(), [25, 75])
    assert iqr_outliers(v) == int((v.numpy() > q3 + 1.5 * (q3 - q1)).sum()) > 0


def test_the_uniform_step_follows_the_code_at_576_tokens():
    for outliers in range(1, 577):  # the code: int(int(1 / ratio) / 3), ratio = outliers / 576
        ratio = len(range(outliers)) / 576
        code = int(int(1 / ratio) / 3)
        assert sample_step(576, outliers) == max(1, code)
    assert uniform_positions(576, 6).tolist() == list(range(0, 575, 6))
    assert sample_step(16, 0) == 16 and uniform_positions(16, 16).tolist() == [0]


def test_merged_embeddings_equal_the_rule_on_the_same_tensors():
    """40 tokens, 3 outliers, 32 neighbours (of 39): every kept token is its features plus the attention-weighted
    features of its 32 key-nearest tokens, the extra token the weighted sum of the pruned ones, all projected."""
    attention = spiked(40, [17, 3, 30])
    tokens, features, keys = item(attention, 5, 8)
    selection = mmprune.get("prumerge", keep=0.5).prune_image(tokens)
    assert selection.slots.tolist()[:3] == [17, 3, 30]  # outliers by descending attention, not re-sorted
    pruned = [j for j in range(40) if j not in (17, 3, 30)]
    assert selection.slots.tolist()[3] == max(pruned, key=lambda j: float(attention[j]))  # the extra token's slot
    expected = 2 * reference_merge(features, keys, attention, [17, 3, 30]) + 1
    torch.testing.assert_close(selection.embeds.double(), expected, rtol=1e-5, atol=1e-6)
    assert selection.merged == 4 and "3 of 40 tokens above Q3 + 1.5 IQR" in selection.note


def test_fewer_neighbours_merge_fewer_tokens():
    attention = spiked(40, [17, 3, 30])
    tokens, features, keys = item(attention, 5, 8, seed=3)
    selection = mmprune.get("prumerge", keep=0.5, neighbours=4).prune_image(tokens)
    expected = 2 * reference_merge(features, keys, attention, [17, 3, 30], neighbours=4) + 1
    torch.testing.assert_close(selection.embeds.double(), expected, rtol=1e-5, atol=1e-6)
    wider = mmprune.get("prumerge", keep=0.5).prune_image(tokens)
    assert not torch.allclose(selection.embeds[0], wider.embeds[0])


def test_prumerge_plus_adds_exactly_the_uniform_samples_not_already_chosen():
    """2 outliers of 40: step (40 // 2) // 3 = 6, positions 0, 6, ..., 36; the outlier at 6 is not added twice."""
    attention = spiked(40, [6, 17])
    tokens, features, keys = item(attention, 5, 8)
    selection = mmprune.get("prumerge_plus", keep=0.5).prune_image(tokens)
    samples = [0, 12, 18, 24, 30, 36]
    kept = [6, 17] + samples
    slots = selection.slots.tolist()
    assert slots[:-1] == kept
    assert slots[-1] == max((j for j in range(40) if j not in kept), key=lambda j: float(attention[j]))
    expected = 2 * reference_merge(features, keys, attention, kept) + 1
    torch.testing.assert_close(selection.embeds.double(), expected, rtol=1e-5, atol=1e-6)
    assert "6 uniform samples (step 6)" in selection.note


def test_keep_is_an_upper_bound():
    """5 outliers; keep=4 keeps the 3 highest and the extra token. PruMerge+ with 2 outliers under keep=6: the
    step widens from 6 until the samples fit in the 3 places left (step 13: 0, 13, 26)."""
    attention = spiked(40, [9, 1, 22, 35, 14])
    tokens, features, keys = item(attention, 5, 8)
    free = mmprune.get("prumerge", keep=0.5).prune_image(tokens)
    assert free.count == 6
    capped = mmprune.get("prumerge", keep=4).prune_image(tokens)
    assert capped.slots.tolist()[:3] == [9, 1, 22] and capped.count == 4
    assert "capped at 3 by keep=4" in capped.note
    torch.testing.assert_close(capped.embeds.double(),
                               2 * reference_merge(features, keys, attention, [9, 1, 22]) + 1, rtol=1e-5, atol=1e-6)

    attention = spiked(40, [6, 17])
    tokens, _, _ = item(attention, 5, 8)
    plus = mmprune.get("prumerge_plus", keep=6).prune_image(tokens)
    assert plus.slots.tolist()[:-1] == [6, 17, 0, 13, 26] and plus.count == 6
    assert "uniform step widened from 6 to 13" in plus.note
    tight = mmprune.get("prumerge_plus", keep=3).prune_image(tokens)  # only the outliers fit
    assert tight.slots.tolist()[:-1] == [6, 17] and "no uniform sample fits" in tight.note
    assert mmprune.get("prumerge", keep=1).prune_image(tokens).count == 1  # the extra token alone


def test_keep_all_is_the_identity():
    tokens, _, _ = item(spiked(40, [6, 17]), 5, 8)
    for name in ("prumerge", "prumerge_plus"):
        assert mmprune.get(name, keep=1.0).prune_image(tokens).is_identity(40)


def spy(pruner):
    seen = []
    original = pruner.select

    def recording(tokens, k):
        seen.append((tokens, original(tokens, k)))
        return seen[-1][1]

    pruner.select = recording
    return seen


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_on_llava_the_tokens_entering_the_llm_are_the_rule_on_eager_tensors(name):
    """Tiny LLaVA: last-layer attention and keys as the code computes them, penultimate-layer features, the merge
    written out, then the model's own projector."""
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    pruner = mmprune.get(name, keep=0.5, neighbours=5)
    seen = spy(pruner)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    (tokens, selection), = seen
    out = _eager_llava_vision(model, inputs["pixel_values"])
    last = model.model.vision_tower.encoder.layers[-1]
    with torch.no_grad():
        x = last.layer_norm1(out.hidden_states[-2])
        q, key = last.self_attn.q_proj(x)[0], last.self_attn.k_proj(x)[0]
        a = (q[0] @ key.T / 32**0.5).softmax(-1)[1:]
        features = out.hidden_states[-2][0, 1:]
        kept = selection.slots.tolist()[:-1]
        expected = model.model.multi_modal_projector(reference_merge(features, key[1:], a, kept, 5).float())
    torch.testing.assert_close(tokens.get("last_layer_cls_attention"), a)
    torch.testing.assert_close(tokens.get("last_layer_keys"), key[1:])
    torch.testing.assert_close(selection.embeds, expected, rtol=1e-4, atol=1e-5)


def test_llava_next_takes_each_crops_own_last_layer_row_and_never_keeps_newlines():
    """Per crop, the eager last-layer [CLS] row and keys, packed with the model's own pack_image_features (zeros
    on newlines); no newline slot in the output, and the merge runs over the patches only."""
    model = tiny_model("llava_next")
    inputs = tiny.batch("llava_next", ONE_IMAGE)
    out = _eager_llava_vision(model, inputs["pixel_values"][0])
    last = model.model.vision_tower.encoder.layers[-1]
    with torch.no_grad():
        x = last.layer_norm1(out.hidden_states[-2])
        q, key = last.self_attn.q_proj(x), last.self_attn.k_proj(x)
        rows = (q[:, :1] @ key.transpose(-1, -2) / 32**0.5).softmax(-1)[:, 0, 1:]  # (crops, 16)
        table = torch.cat([rows.unsqueeze(-1), key[:, 1:]], dim=-1)  # (crops, 16, 1 + 32)
        packed, _ = model.model.pack_image_features([table], inputs["image_sizes"], "default",
                                                    image_newline=torch.zeros(33))
    packed = packed[0]
    pruner = mmprune.get("prumerge_plus", keep=0.5)
    seen = spy(pruner)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    (tokens, selection), = seen
    torch.testing.assert_close(tokens.get("last_layer_cls_attention"), packed[:, 0])
    torch.testing.assert_close(tokens.get("last_layer_keys"), packed[:, 1:])
    newlines = {int(i) for s in tokens.segments for i in s.newline_indices()}
    assert newlines and not newlines & set(selection.slots.tolist())
    valid = [i for i in range(tokens.num_tokens) if i not in newlines]
    position = {t: p for p, t in enumerate(valid)}
    kept = [position[s] for s in selection.slots.tolist()[:-1]]
    with torch.no_grad():
        expected = tokens.project(reference_merge(tokens.get("vision_features")[valid], packed[valid, 1:],
                                                  packed[valid, 0], kept).to(tokens.embeds.dtype))
    torch.testing.assert_close(selection.embeds, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava_onevision"])
def test_without_cls_the_substitute_is_received_attention_keys_and_embeddings(family_name):
    model = tiny_model(family_name)
    pruner = mmprune.get("prumerge_plus", keep=0.5)
    seen = spy(pruner)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family_name, ONE_IMAGE))
    (tokens, selection), = seen
    assert not tokens.has("last_layer_cls_attention")
    newlines = {int(i) for s in tokens.segments for i in s.newline_indices()}
    valid = [i for i in range(tokens.num_tokens) if i not in newlines]
    position = {t: p for p, t in enumerate(valid)}
    a = tokens.token_attention.float().mean(0)[valid]
    order = sorted(range(len(valid)), key=lambda p: (-float(a[p]), p))
    outliers = iqr_outliers(a)
    kept = [position[s] for s in selection.slots.tolist()[:-1]]
    assert kept[:outliers] == order[:outliers]
    expected = reference_merge(tokens.embeds[valid], tokens.get("vision_keys")[valid], a, kept)
    torch.testing.assert_close(selection.embeds.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, captured", [("fastervlm", False), ("prumerge", True), ("prumerge_plus", True)])
def test_the_last_layer_is_captured_only_for_methods_that_read_it(method, captured):
    model = tiny_model("llava")
    with mmprune.get(method, keep=4).attach(model) as session, torch.no_grad():
        model(**tiny.batch("llava", ONE_IMAGE))
        assert ("clip_last_attn_in" in session.adapter.captured) is captured


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="neighbours"):
        mmprune.get("prumerge", neighbours=0)
    with pytest.raises(ValueError, match="iqr_factor"):
        mmprune.get("prumerge_plus", iqr_factor=-1)
