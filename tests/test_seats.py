"""SEATS: its schedule solver, its windowed diverse selection before the LLM, its window allocation inside it, the
late removal and the reference's cache behaviour, on the tiny Qwen2.5-Omni thinker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import method_for_tiny, tiny_model
from test_omni import interleaved

import tiny
from mmprune import upstream
from mmprune.methods.seats import SeatsPruner, diverse_subset, keep_ratios, window_budgets

FAMILY = "qwen2_5_omni"


@pytest.mark.parametrize("layers, late, depth, expected", [
    ([16, 18, 20], 23, 28, [0.9298, 0.7949, 0.2986]),  # Qwen2.5-Omni-7B (the reference's scheduler)
    ([27, 31, 35], 39, 48, [0.9255, 0.7813, 0.239]),  # Qwen3-Omni-30B
])
@pytest.mark.parametrize("target", [0.06, 0.1, 0.3, 1.0])
def test_the_schedule_solver_gives_the_reference_ratios_whatever_the_target(layers, late, depth, expected, target):
    assert keep_ratios(1.4 * target, target, layers, late, depth) == expected


def test_the_default_stages_scale_with_depth():
    assert SeatsPruner().schedule_layers(28) == ([16, 18, 20], 23)
    assert SeatsPruner().schedule_layers(48) == ([27, 31, 35], 39)  # the reference's Qwen3-Omni-30B config
    assert SeatsPruner().schedule_layers(24) == ([14, 15, 17], 20)
    with pytest.raises(ValueError, match=r"must increase strictly within 1..3 for a 4-layer language model"):
        SeatsPruner().schedule_layers(4)


def naive_subset(features: torch.Tensor, attention: torch.Tensor, count: int) -> list[int]:
    """winDivPrune written out again with Python loops."""
    n = features.shape[0]
    cos = F.cosine_similarity(features[:, None].float(), features[None].float(), dim=-1)
    distance = [[(1.0 - float(cos[i, j])) * float(attention[j]) * 1e6 for j in range(n)] for i in range(n)]
    second = [sorted(distance[i][j] for i in range(n))[1] for j in range(n)]
    picks = [max(range(n), key=lambda j: (second[j], -j))]
    while len(picks) < count:
        nearest = [-1.0 if j in picks else min(distance[p][j] for p in picks) for j in range(n)]
        picks.append(max(range(n), key=lambda j: (nearest[j], -j)))
    return sorted(picks)


@pytest.mark.parametrize("count", [1, 3, 7])
def test_the_diverse_subset_equals_the_rule_written_out(count):
    g = torch.Generator().manual_seed(count)
    features, attention = torch.randn(12, 6, generator=g), torch.rand(12, generator=g) * 1e-3
    assert diverse_subset(features, attention, count).tolist() == naive_subset(features, attention, count)


@pytest.mark.parametrize("seed", range(6))
def test_the_window_allocation_meets_the_budget_and_serves_every_modality(seed):
    g = torch.Generator().manual_seed(seed)
    windows = int(torch.randint(2, 6, (1,), generator=g))
    sizes = {"video": torch.randint(1, 20, (windows,), generator=g).tolist(),
             "audio": torch.randint(1, 30, (windows - seed % 2,), generator=g).tolist()}
    start, runs = 0, {"video": [], "audio": []}
    for i in range(windows):  # the processor's layout: each chunk's video, then its audio
        for m in ("video", "audio"):
            if i < len(sizes[m]):
                runs[m].append(torch.arange(start, start + sizes[m][i]))
                start += sizes[m][i]
    scores = torch.rand(start, generator=g)
    totals = {m: max(1, round(0.3 * sum(sizes[m]))) for m in runs}
    budgets = window_budgets(scores, runs, totals, 0.1)
    total = totals["video"] + totals["audio"]
    # the window budgets sum to the total; a window whose budget is 1 but holds both modalities keeps one of each
    # (as the code), so the split may exceed the total by one per such window
    assert total <= sum(budgets["video"]) + sum(budgets["audio"]) <= total + windows
    for m in runs:
        assert all(1 <= b <= size for b, size in zip(budgets[m], sizes[m]))


def seats_run(shrink: bool = True):
    model = tiny_model(FAMILY)
    inputs = interleaved()
    pruner = method_for_tiny("seats", keep=0.3, keep_audio=0.6, shrink_earlier_caches=shrink)
    with pruner.attach(model), torch.no_grad():
        cache = upstream.output_cache(model(**inputs, use_cache=True))
    return inputs, pruner, cache


def test_the_layer_average_meets_each_target_and_nothing_survives_the_late_layer():
    """Video: 64 tokens at R = 0.3, audio: 100 at 0.6, on 4 layers (drops before 1 and 2, late removal before 3):
    pre-LLM 1.4 R per window, then the solver's ratios; the average over the layers is within one token per stage
    of the target."""
    _, pruner, _ = seats_run()
    per_layer = pruner.stats["samples"][0]["tokens_per_layer_by_modality"]
    assert per_layer["video"][-1] == per_layer["audio"][-1] == 0
    for modality, tokens, target in (("video", 64, 0.3), ("audio", 100, 0.6)):
        assert abs(sum(per_layer[modality]) / 4 - target * tokens) <= 3
    assert pruner.stats["schedule"]["keep_ratios"] == keep_ratios(1.4, 1.0, [1, 2], 3, 4)


@pytest.mark.parametrize("shrink", [True, False])
def test_the_cache_holds_the_final_tokens_with_the_reference_behaviour(shrink):
    inputs, pruner, cache = seats_run(shrink)
    ids = inputs["input_ids"][0]
    text = int(((ids != tiny.VIDEO_TOKEN) & (ids != tiny.AUDIO_TOKEN)).sum())
    lengths = [upstream.cache_length(cache, layer) for layer in range(4)]
    if shrink:  # every layer's cache is cut with each drop: after the late removal, text only
        assert lengths == [text] * 4
    else:  # mmprune's per-layer cache: each layer keeps the tokens that entered it
        assert lengths == [text + n for n in pruner.stats["samples"][0]["tokens_per_layer"]]


def test_decoding_after_the_reference_cache_cut_continues_the_prompt():
    """With every cache cut to text, the decode steps still see one mask entry per cached token and continue at the
    last prompt token's position + 1."""
    model = tiny_model(FAMILY)
    inputs = interleaved()
    pruner = method_for_tiny("seats", keep=0.3, keep_audio=0.6)
    with pruner.attach(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_the_pre_llm_selection_equals_the_rule_on_the_items_own_features():
    """Before the LLM each window (2 temporal grids of video = 32 tokens; 2 s of audio = 50 tokens) keeps
    round(1.4 R n) tokens chosen by winDivPrune on the LLM-input embeddings, weighted by the encoder attention."""
    model = tiny_model(FAMILY)
    inputs = interleaved()
    seen = {}
    pruner = method_for_tiny("seats", keep=0.3, keep_audio=0.6)
    original = pruner.prune_image

    def spy(tokens):
        seen[tokens.modality] = (tokens.embeds.clone(), tokens.token_attention.mean(0).clone())
        return original(tokens)

    pruner.prune_image = spy
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    sample = pruner.stats["samples"][0]
    for modality, key, window, ratio in (("video", "videos", 32, 1.4 * 0.3), ("audio", "audios", 50, 1.4 * 0.6)):
        embeds, attention = seen[modality]
        expected = []
        for start in range(0, embeds.shape[0], window):
            end = min(start + window, embeds.shape[0])
            count = max(1, min(end - start, round(ratio * (end - start))))
            expected += [start + i for i in naive_subset(embeds[start:end], attention[start:end], count)]
        assert sample[key][0]["kept"] == expected


def test_with_per_layer_caches_decoding_equals_an_uncached_replay():
    """shrink_earlier_caches=False: each layer keeps the tokens that entered it, so each decode step equals one
    uncached pass over prompt + generated tokens that applies the same selections at the same layers."""
    from test_in_llm import Recorded, record, with_tokens

    class RecordedMedia(Recorded):
        modalities = ("image", "video", "audio")
        variable_counts = True  # SEATS' counts are upper bounds: replay every stage's selection as made

    model = tiny_model(FAMILY)
    inputs = interleaved()
    pruner = method_for_tiny("seats", keep=0.3, keep_audio=0.6, shrink_earlier_caches=False)
    out, replay = record(pruner, model, lambda: model.generate(
        **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True))
    replay = RecordedMedia(**{f: getattr(replay, f) for f in ("pre", "layers", "counts", "stages", "positions")})
    with replay.attach(model), torch.no_grad():
        logits = model(**with_tokens(inputs, out.sequences), use_cache=False).logits
    decoded = torch.stack(out.logits, dim=1)[0]
    torch.testing.assert_close(logits[0, -4:-1], decoded, rtol=1e-4, atol=1e-4)
