"""FrameFusion: the cost model, the merging of runs across frames, and its schedule on a model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.methods.framefusion import merge_runs, predecessor_similarity, pruning_ratio


@pytest.mark.parametrize("shares, cost, layers, expected", [
    ([], 0.3, 28, 0.7),  # before any merging: 1 - cost
    ([0.4, 0.2, 0.05], 0.3, 28, 1 - (8.4 - 1.536) / (25 * 0.456)),  # densities 0.6, 0.48, 0.456
    ([0.9], 0.3, 28, 0.0),  # merging alone is within the budget
    ([0.0], 0.25, 4, 1.0),  # layer 0 at full density spent the whole budget of a 4-layer model
    ([], 1.0, 28, 0.0),
])
def test_pruning_ratio_meets_the_cost_over_the_layers(shares, cost, layers, expected):
    assert pruning_ratio(shares, cost, layers) == pytest.approx(expected)


def test_runs_of_alike_tokens_fold_into_the_earliest_one_at_their_position():
    """Three frames of two positions (token = frame * 2 + position). Position 0 is the same in every frame, so
    tokens 2 and 4 form one run folding into token 0; position 1 changes, so nothing merges there."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, -1.0], [1.0, 0.2], [-1.0, 0.0]])
    patch = torch.tensor([0, 1, 0, 1, 0, 1])
    similarity = predecessor_similarity(hidden, patch)
    assert similarity[0] == similarity[1] == -2.0  # the first frame has no predecessor
    assert similarity[2] > 0.99 and similarity[4] > 0.99 and similarity[3] < 0.6 and similarity[5] < 0.6
    selection = merge_runs(hidden, patch, similarity >= 0.6)
    assert selection.slots.tolist() == [0, 1, 3, 5] and selection.merged == 1
    torch.testing.assert_close(selection.embeds[0], torch.tensor([1.0, 0.1]))  # mean of tokens 0, 2, 4
    torch.testing.assert_close(selection.embeds[1:], hidden[[1, 3, 5]])


def test_tokens_outside_the_frames_are_never_merged():
    hidden = torch.ones(5, 3)
    patch = torch.tensor([0, 1, 0, 1, -1])  # two frames of two tokens, then LLaVA-OneVision's trailing newline
    similarity = predecessor_similarity(hidden, patch)
    assert similarity.tolist() == pytest.approx([-2.0, -2.0, 1.0, 1.0, -2.0])


def still_video(family: str) -> dict:
    """A Qwen video whose two temporal grids are the same pixels: every token of grid 1 matches grid 0."""
    inputs = tiny.batch(family, [[3, ("vid", 0), 4]])
    pixels = inputs["pixel_values_videos"]
    half = pixels.shape[0] // 2
    pixels[half:] = pixels[:half]
    return inputs


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_still_video_merges_its_second_grid_then_prunes_by_attention(family):
    """cost 0.3 on 4 layers: step 1 (LLM input) merges all 16 tokens of grid 1 (r = 0.5 < 1 - 0.3), step 2 (layer
    1) finds nothing left to merge (r = 0 < 0.1) and stops, so layer 2 prunes: densities 0.5, 0.5 -> T = 1,
    x = (4 * 0.3 - 1) / (2 * 0.5) = 0.2, p = 0.8, round(16 * 0.2) = 3 tokens from layer 2 on."""
    model = tiny_model(family)
    pruner = mmprune.get("framefusion", keep=0.3)
    with pruner.attach(model), torch.no_grad():
        model.generate(**still_video(family), max_new_tokens=2, do_sample=False)
    sample = pruner.stats["samples"][0]
    video = sample["videos"][0]
    assert video["after"] == 16 and video["merged"] == 16 and video["kept"] == list(range(16))
    assert sample["tokens_per_layer"] == [16, 16, 3, 3]
    (schedule,) = pruner.stats["schedule"]["videos"]
    assert schedule["merged_shares"] == [0.5, 0.0] and schedule["pruned_at_layer"] == 2
    assert schedule["pruning_ratio"] == pytest.approx(0.8)


def test_when_merging_alone_meets_the_budget_nothing_is_pruned():
    """cost 0.5: r = 0.5 is not below 1 - 0.5, so the int(0.5 * 32) = 16 most alike merge and the video is done."""
    model = tiny_model("qwen2_vl")
    pruner = mmprune.get("framefusion", keep=0.5)
    with pruner.attach(model), torch.no_grad():
        model(**still_video("qwen2_vl"))
    sample = pruner.stats["samples"][0]
    assert sample["tokens_per_layer"] == [16, 16, 16, 16]
    assert pruner.stats["schedule"]["videos"][0]["pruned_at_layer"] is None


def test_framefusion_checks_its_fields_at_get():
    with pytest.raises(ValueError, match="similarity_lower_bound"):
        mmprune.get("framefusion", similarity_lower_bound=1.5)
    with pytest.raises(ValueError, match="queries"):
        mmprune.get("framefusion", queries=0)
