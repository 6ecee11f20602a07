"""Property-based tests: random batch compositions and budgets, every method, on tiny models of families drawn among
those that run it (the fixed method x family matrix is tests/test_pre_llm.py's).

For 1-4 samples with 0-3 images each, random text lengths and left or right padding, and a random budget in the
method's range:
  * kept counts follow the budget rule (pre-LLM budget per image; each in-LLM stage's count from the schedule);
  * every layer's KV cache holds, per sample, its text plus the visual tokens entering that layer (the batch is
    re-padded to the longest sample);
  * each sample of the padded batch gets the same kept tokens and the same last-token logits as that sample alone;
  * ``keep=1.0`` reproduces the unpruned model.

Examples are derandomized (CI sees the same ones every run); a failure prints the falsifying composition and budget
(and a reproduction blob). ``MMPRUNE_HYPOTHESIS_EXAMPLES=50`` searches more locally.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from conftest import adaptive_count, averages_over_layers, decoder, families_running, pruning, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmprune
import tiny
from mmprune import upstream
from mmprune.engine.session import final_kept
from mmprune.media import Segment
from mmprune.methods.grid import lattice_shape, per_segment_budget

METHODS = pruning("image")
EXAMPLES = int(os.environ.get("MMPRUNE_HYPOTHESIS_EXAMPLES", "12"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def compositions(draw, max_images: int = 3) -> list[list]:
    """Samples as tiny.batch describes them: text, then (image, text) pairs; at least one text token after each
    image (a prompt's instruction)."""
    samples = []
    for _ in range(draw(st.integers(1, 4))):
        parts: list = [draw(st.integers(1, 5))]
        for _ in range(draw(st.integers(0, max_images))):
            parts += [("img", draw(st.integers(0, 3))), draw(st.integers(1, 5))]
        samples.append(parts)
    return samples


def families_for(method: str):
    """The families that run ``method``, rotated by its place among METHODS: derandomized examples draw the same
    places of the list for every method, and the rotation spreads those draws over every family."""
    families = families_running(method)
    start = METHODS.index(method) % len(families)
    return st.sampled_from(families[start:] + families[:start])


def budgets(method: str):
    if averages_over_layers(method):  # every token runs until the first stage: half is the reachable floor
        return st.sampled_from([0.5, 0.75, 1.0])
    # counts from 6: VisionZip needs room for its contextual tokens (5% of LLaVA-NeXT's 88) plus dominant ones
    return st.one_of(st.sampled_from([0.25, 0.5, 0.75, 1.0]), st.integers(6, 16))


def text_tokens(inputs: dict, sample: int) -> int:
    real = inputs["attention_mask"][sample].bool()
    return int((real & (inputs["input_ids"][sample] != tiny.IMAGE_TOKEN)).sum())


def with_positions(family: str, inputs: dict) -> dict:
    """Position ids counted over real tokens, as generate() gives them (a plain forward would count left padding;
    M-RoPE models compute theirs from the mask)."""
    if not family.startswith("qwen"):
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return inputs


def prefill(model, inputs: dict):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out.logits, upstream.output_cache(out)


def last_real(inputs: dict) -> torch.Tensor:
    mask = inputs["attention_mask"].bool()
    positions = torch.arange(mask.shape[1])
    return torch.where(mask, positions, -1).amax(dim=1)


def expected_pre_llm(pruner, image: dict) -> int:
    """The pre-LLM budget rule: ``pre_llm_budget`` tokens; pool keeps the largest lattice within each segment's
    share (slightly fewer where the share does not factor)."""
    k = pruner.pre_llm_budget(image["before"])
    if pruner.name != "pool" or k == image["before"]:
        return k
    layout = SimpleNamespace(segments=[Segment(*segment) for segment in image["segments"]])
    return sum(r * c for r, c in (lattice_shape(segment.rows, segment.cols, share)
                                  for segment, share in per_segment_budget(layout, k)))


def check_budget_rule(pruner, stats: dict) -> None:
    images = [image for sample in stats["samples"] for image in sample["images"]]
    if pruner.stage != "in-llm":
        for image in images:
            if adaptive_count(pruner.name):  # keep is the most an image keeps
                assert 1 <= image["after"] <= expected_pre_llm(pruner, image), (image["before"], image["after"])
                continue
            assert image["after"] == expected_pre_llm(pruner, image), (image["before"], image["after"])
    if "in-llm" not in pruner.stage or "schedule" not in stats:
        return
    schedule = stats["schedule"]
    counts = schedule.get("counts_with_recycled") or schedule.get("counts")
    for index, image in enumerate(images):
        kept = [len(stage["kept"]) for stage in image.get("stages", [])]
        if counts is not None:
            planned = counts[index]
            if pruner.variable_counts:
                assert all(k <= p for k, p in zip(kept, planned))
            else:
                assert kept == planned, (kept, planned)
        elif schedule.get("mode") == "single stage":
            assert kept == [pruner.budget(image["after"])]
    if averages_over_layers(pruner.name) and schedule.get("planned_equivalent_tokens"):
        for index, image in enumerate(images):
            target = pruner._target(SimpleNamespace(count=image["after"]))
            assert schedule["planned_equivalent_tokens"][index] <= target + 1e-6


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
@PROPERTY
def test_random_batches_follow_the_contract(method, data):
    family = data.draw(families_for(method), label="family")
    model = tiny_model(family)
    samples = data.draw(compositions(), label="samples")
    side = data.draw(st.sampled_from(["left", "right"]), label="padding")
    keep = data.draw(budgets(method), label="keep")
    inputs = with_positions(family, tiny.batch(family, samples, side=side))
    pruner = mmprune.get(method, keep=keep)
    with pruner.attach(model):
        logits, cache = prefill(model, inputs)
        stats = pruner.stats if any(isinstance(p, tuple) for s in samples for p in s) else None
        batch_kept = final_kept(stats) if stats else None
        batch_stats = stats
        layers = len(decoder(model).layers)
        if stats is not None:
            check_budget_rule(pruner, stats)
            per_sample = [[text_tokens(inputs, i) + n for n in s["tokens_per_layer"]]
                          for i, s in enumerate(stats["samples"])]
            # linear-attention layers (Qwen3.5) keep a state, not a sequence: no length to compare
            kinds = upstream.layer_kinds(decoder(model))
            counted = [layer for layer in range(layers) if kinds[layer] != "linear_attention"]
            assert [upstream.cache_length(cache, layer) for layer in counted] == \
                [max(lengths[layer] for lengths in per_sample) for layer in counted]
        # each sample alone: same kept tokens, same logits at its last real token
        ends = last_real(inputs)
        for i, sample in enumerate(samples):
            alone_inputs = with_positions(family, tiny.batch(family, [sample]))
            alone_logits, _ = prefill(model, alone_inputs)
            if batch_stats is not None and batch_stats["samples"][i]["images"]:
                assert final_kept(pruner.stats)[0] == batch_kept[i]
            if side == "left" or batch_stats is None:
                position = ends[i] if side == "right" else -1
            else:  # right padding: the sample's last token moved left by what it dropped before the last layer
                dropped = batch_stats["samples"][i]["visual_tokens_before"] - \
                    batch_stats["samples"][i]["tokens_per_layer"][-1]
                position = ends[i] - dropped
            torch.testing.assert_close(logits[i, position], alone_logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
@PROPERTY
def test_keep_all_reproduces_the_unpruned_model_on_random_batches(method, data):
    family = data.draw(families_for(method), label="family")
    model = tiny_model(family)
    samples = data.draw(compositions(max_images=2), label="samples")
    side = data.draw(st.sampled_from(["left", "right"]), label="padding")
    inputs = tiny.batch(family, samples, side=side)
    reference, _ = prefill(model, inputs)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False) if side == "left" else None
    with mmprune.get(method, keep=1.0).attach(model):
        logits, _ = prefill(model, inputs)
        with torch.no_grad():
            pruned_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False) if side == "left" else None
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # padding positions included
    if side == "left":  # right-padded generate() reads a padding position's logits: not defined, not compared
        assert torch.equal(pruned_tokens, tokens)
