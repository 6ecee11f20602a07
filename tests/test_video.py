"""Videos on Qwen2-VL / Qwen2.5-VL, LLaVA-NeXT-Video and LLaVA-OneVision: items, placement, decode positions, stats, EVS, DyCoke
and the video baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import method_for_tiny, pruning, tiny_model

import mmprune
import tiny
from mmprune import upstream
from mmprune.engine.session import final_kept

QWEN = ["qwen2_vl", "qwen2_5_vl"]
FAMILIES = QWEN + ["qwen3_vl", "llava_next_video", "llava_onevision"]
VIDEO_METHODS = pruning("video")
GEN = dict(max_new_tokens=3, do_sample=False)
VIDEO = [[3, ("vid", 0), 4]]
MIXED = [[2, ("img", 0), 3, ("vid", 1), 2], [1, ("vid", 0), 5], [4, ("img", 1), 2]]


def keep_for(method: str) -> float:
    return 0.5 if mmprune.METHODS[method].keep_means.startswith(("equivalent", "nominal")) else 0.25


def late_video(family: str) -> dict:
    """A video-only prompt whose temporal ids run past the trailing text's (Qwen2.5-VL: 5 s per grid x 2 tokens
    per second = 10 ids per grid, while the text after a 4x4 grid continues 4 ids after its start)."""
    inputs = tiny.batch(family, VIDEO)
    if family == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([5.0])
    return inputs


def positions_seen(model, run):
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
    try:
        with torch.no_grad():
            out = run()
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("family", QWEN)
def test_the_late_video_prompt_has_temporal_ids_beyond_the_text(family):
    if family != "qwen2_5_vl":
        pytest.skip("Qwen2-VL spaces grids by one id")
    model = tiny_model(family)
    inputs = late_video(family)
    ids, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        video_grid_thw=inputs["video_grid_thw"],
                                        second_per_grid_ts=inputs["second_per_grid_ts"])
    assert int(ids[0, 0].max()) > int(ids[0, 0, -1])  # what max + 1 would get wrong


@pytest.mark.parametrize("method", VIDEO_METHODS + ["none"])
@pytest.mark.parametrize("layout", ["late video", "image+video", "padded left", "padded right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_the_unpruned_model_on_videos(family, layout, method):
    model = tiny_model(family)
    if layout == "late video":
        inputs = late_video(family)
    elif layout == "image+video":
        inputs = tiny.batch(family, [[2, ("img", 0), 3, ("vid", 0), 4]])
    else:
        inputs = tiny.batch(family, [[3, ("vid", 0), 4], [1, ("vid", 1), 2]], side=layout.split()[1])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
        reference = model.generate(**inputs, **GEN) if layout != "padded right" else None
    pruner = method_for_tiny(method, keep=1.0)
    with pruner.attach(model), torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, **GEN) if layout != "padded right" else None
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    if reference is not None:
        assert torch.equal(tokens, reference)
    videos = [v for s in pruner.stats["samples"] for v in s["videos"]]
    assert videos and all(v["after"] == v["before"] and v["modality"] == "video" for v in videos)


@pytest.mark.parametrize("method", VIDEO_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_video_batch_equals_each_sample_alone(family, method):
    model = tiny_model(family)
    pruner = method_for_tiny(method, keep=keep_for(method))
    with pruner.attach(model), torch.no_grad():
        batch_out = model.generate(**tiny.batch(family, MIXED), **GEN)
        videos, images = trajectory(pruner.stats, "videos"), trajectory(pruner.stats, "images")
        for i, sample in enumerate(MIXED):
            alone = model.generate(**tiny.batch(family, [sample]), **GEN)
            assert trajectory(pruner.stats, "videos")[0] == videos[i]
            assert trajectory(pruner.stats, "images")[0] == images[i]
            assert torch.equal(alone[0, -GEN["max_new_tokens"]:], batch_out[i, -GEN["max_new_tokens"]:])
    entering = [len(kept) for sample in videos for kept, _ in sample]
    assert entering and all(0 < k for k in entering)


def trajectory(stats: dict, key: str) -> list:
    """Per sample and item: the tokens entering the LLM and those kept at every in-LLM stage."""
    return [[(item["kept"], [stage["kept"] for stage in item.get("stages", [])]) for item in sample[key]]
            for sample in stats["samples"]]


@pytest.mark.parametrize("method", ["evs", "fastv", "random"])
@pytest.mark.parametrize("family", QWEN)
def test_decoding_continues_after_the_last_prompt_token(family, method):
    """The first decode step's positions equal those generate() gives the unpruned model: the last real prompt
    token's + 1 on every row (not the row maximum, which a late video's temporal ids exceed)."""
    model = tiny_model(family)
    inputs = late_video(family)
    _, unpruned = positions_seen(model, lambda: model.generate(**inputs, **GEN))
    with mmprune.get(method, keep=0.75).attach(model):  # EVS then keeps tokens of the late grid too
        _, pruned = positions_seen(model, lambda: model.generate(**inputs, **GEN))
    for step in (1, 2):
        assert torch.equal(pruned[step][-3:].reshape(3, -1), unpruned[step][-3:].reshape(3, -1)), step


@pytest.mark.parametrize("method", ["evs", "dycoke", "framefusion", "uniform", "pool", "divprune", "fastv", "dart"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_holds_text_plus_every_items_tokens(family, method):
    model = tiny_model(family)
    inputs = tiny.batch(family, [[2, ("img", 0), 3, ("vid", 1), 2]])
    media = (inputs["input_ids"] == tiny.IMAGE_TOKEN) | (inputs["input_ids"] == tiny.VIDEO_TOKEN)
    text = int((~media).sum())
    pruner = mmprune.get(method, keep=0.5)
    with pruner.attach(model), torch.no_grad():
        cache = upstream.output_cache(model(**inputs, use_cache=True))
    sample = pruner.stats["samples"][0]
    layers = len(sample["tokens_per_layer"])
    assert [upstream.cache_length(cache, layer) for layer in range(layers)] == \
        [text + n for n in sample["tokens_per_layer"]]
    by_modality = sample["tokens_per_layer_by_modality"]
    assert [a + b for a, b in zip(by_modality["image"], by_modality["video"])] == sample["tokens_per_layer"]


def test_video_stats_describe_frames_times_and_kept_per_frame():
    model = tiny_model("qwen2_5_vl")
    inputs = tiny.batch("qwen2_5_vl", [[2, ("vid", 1), 3]])
    inputs["second_per_grid_ts"] = torch.tensor([0.5])
    pruner = mmprune.get("uniform", keep=12)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["modality"] == "video" and video["before"] == 48 and video["after"] == 12
    assert video["frames"] == [2, 4, 6] and video["frame_times"] == [0.0, 0.5]
    assert video["kept_per_frame"] == [6, 6] and sum(video["kept_per_frame"]) == len(video["kept"])
    assert [s[:3] for s in video["segments"]] == [[0, 4, 6], [24, 4, 6]]
    assert pruner.stats["samples"][0]["images"] == []


def evs_rule(embeds: torch.Tensor, frames: int, count: int) -> list[int]:
    """EVS written out again: per position, 1 - cos to the previous grid (first grid: 255), most dissimilar
    first, earlier token first on ties."""
    grids = embeds.float().reshape(frames, -1, embeds.shape[-1])
    scores = [(255.0, 0, p) for p in range(grids.shape[1])]
    for t in range(1, frames):
        for p in range(grids.shape[1]):
            cos = F.cosine_similarity(grids[t, p], grids[t - 1, p], dim=0)
            scores.append((1.0 - float(cos), t, p))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i][0], i))
    return sorted(order[:count])


@pytest.mark.parametrize("keep", [0.75, 0.5, 20])
@pytest.mark.parametrize("family", FAMILIES)
def test_evs_keeps_the_most_changed_tokens_and_the_first_grid(family, keep):
    model = tiny_model(family)
    inputs = tiny.batch(family, [[2, ("vid", 1), 3], [1, ("img", 0), 2, ("vid", 0), 1]])
    captured = {}
    original = model.model.get_video_features

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["embeds"] = [e.detach().clone() for e in upstream.image_features(out)]
        return out

    pruner = mmprune.get("evs", keep=keep)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.model, "get_video_features", spy)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
    videos = final_kept(pruner.stats, "video")
    stats = [pruner.stats["samples"][0]["videos"][0], pruner.stats["samples"][1]["videos"][0]]
    for embeds, kept, video in zip(captured["embeds"], [videos[0][0], videos[1][0]], stats):
        frames, frame = video["frames"][0], video["frames"][1] * video["frames"][2]
        outside = list(range(frames * frame, video["before"]))  # LLaVA-OneVision's trailing newline: always kept
        assert len(outside) == (family == "llava_onevision")
        count = keep if isinstance(keep, int) else int(video["before"] * keep)
        expected = evs_rule(embeds[:frames * frame], frames, max(count, frame + len(outside)) - len(outside))
        assert kept == expected + outside
        assert set(range(frame)) <= set(kept)  # the first grid whole
    image = pruner.stats["samples"][1]["images"][0]
    assert image["after"] == image["before"] == tiny.tokens_per_image(family, 0)  # images untouched


def test_evs_kept_tokens_keep_their_original_ids():
    model = tiny_model("qwen2_5_vl")
    inputs = late_video("qwen2_5_vl")
    original, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             second_per_grid_ts=inputs["second_per_grid_ts"])
    pruner = mmprune.get("evs", keep=0.5)
    with pruner.attach(model):
        _, seen = positions_seen(model, lambda: model(**inputs))
    kept = final_kept(pruner.stats, "video")[0][0]
    video = (inputs["input_ids"][0] == tiny.VIDEO_TOKEN).nonzero().squeeze(1)
    text = (inputs["input_ids"][0] != tiny.VIDEO_TOKEN).nonzero().squeeze(1)
    order = torch.sort(torch.cat([text, video[kept]])).values
    assert torch.equal(seen[0][-3:, 0], original[:, 0, order])


def test_evs_below_one_grid_keeps_one_grid_and_says_so():
    model = tiny_model("qwen2_vl")
    pruner = mmprune.get("evs", keep=4)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("qwen2_vl", VIDEO))
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["after"] == 16 and video["kept"] == list(range(16)) and video["kept_per_frame"] == [16, 0]
    assert video["note"] == ("keep=4 asks for 4 of 32 tokens, less than one grid (16); EVS keeps the first grid "
                             "whole, so 16 are kept")


@pytest.mark.parametrize(("keep", "expected"), [(16, [8, 8]), (3, [2, 1]), (1, [1, 0])])
def test_uniform_spreads_a_video_budget_evenly_in_time(keep, expected):
    model = tiny_model("qwen2_vl")
    pruner = mmprune.get("uniform", keep=keep)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("qwen2_vl", VIDEO))
    assert pruner.stats["samples"][0]["videos"][0]["kept_per_frame"] == expected


@pytest.mark.parametrize(("keep", "after", "per_frame"), [(8, 8, [4, 4]), (1, 1, [1, 0])])
def test_pool_on_videos_pools_in_space_then_in_time(keep, after, per_frame):
    model = tiny_model("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", VIDEO)
    pruner = mmprune.get("pool", keep=keep)
    captured = {}
    original = model.model.get_video_features

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["embeds"] = upstream.image_features(out)[0].detach().clone()
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.model, "get_video_features", spy)
        with pruner.attach(model) as session, torch.no_grad():
            model(**inputs)
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["after"] == after and video["merged"] == after and video["kept_per_frame"] == per_frame
    if keep == 1:  # (2, 2, 2)-style: one token, the mean of both 4x4 grids
        assert session.output_index() is not None
        grids = captured["embeds"].reshape(2, 16, -1)
        expected = grids.mean(0).mean(0)
        from mmprune.methods.pool import PoolPruner, video_groups
        from mmprune.media import MediaItem, Segment

        item = MediaItem(captured["embeds"], [Segment(k * 16, 4, 4, frame=k) for k in range(2)], modality="video")
        assert [len(g) for g, _ in video_groups(item, 1)] == [2]
        selection = PoolPruner(keep=1).select(item, 1)
        torch.testing.assert_close(selection.embeds[0], expected)


def test_the_frames_helper_patchifies_as_the_image_processor_does():
    """A still image is a one-frame video repeated over the temporal patch: the helper's patches for it must equal
    the PIL image processor's, which pins the patch order without torchvision."""
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from mmprune.data.video import qwen_video_inputs

    processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16,
                                         max_pixels=100_000)
    picture = Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8))
    reference = processor(images=[picture], return_tensors="pt")
    ours = qwen_video_inputs([picture], processor, fps=2.0)
    assert torch.equal(ours["video_grid_thw"], reference["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], reference["pixel_values"], rtol=0, atol=1e-6)
    assert ours["video_tokens"] == 1 * 4 * 6 and ours["second_per_grid_ts"].tolist() == [1.0]


def test_frames_to_a_pruned_answer_end_to_end():
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from mmprune.data.video import qwen_video_inputs

    frames = np.zeros((4, 30, 34, 3), np.uint8)  # a square moving right; resized to 32 x 32
    for t in range(4):
        frames[t, 10:20, 4 + 6 * t:14 + 6 * t] = 255
    processor = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2)
    video = qwen_video_inputs(frames, processor, fps=4.0)
    count = video.pop("video_tokens")
    assert video["video_grid_thw"].tolist() == [[2, 8, 8]] and count == 32
    ids = torch.tensor([[5, 6, tiny.VISION_START] + [tiny.VIDEO_TOKEN] * count + [tiny.VISION_END, 7, 8]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=2 * (ids == tiny.VIDEO_TOKEN),
                  **video)
    model = tiny_model("qwen2_5_vl")
    pruner = mmprune.get("evs", keep=0.75)
    with pruner.attach(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
    video_stats = pruner.stats["samples"][0]["videos"][0]
    assert video_stats["after"] == 24 and video_stats["frame_times"] == [0.0, 0.5]
    with pytest.raises(ValueError, match="fps=0"):
        qwen_video_inputs(frames, processor, fps=0)
    with pytest.raises(ValueError, match=r"expected \(T, H, W, 3\) uint8"):
        qwen_video_inputs(frames[..., 0], processor)


@pytest.mark.parametrize(("frames", "expected"), [
    (8, {1: 0, 3: 2, 5: 4, 7: 6, 2: 0}),   # frame 6, the last group's third, stays whole
    (12, {1: 0, 3: 2, 5: 4, 7: 6, 9: 8, 11: 10, 2: 0, 6: 4}),
    (5, {1: 0, 3: 2, 2: 0}),               # odd count: the last frame (4) stays whole
    (2, {1: 0}),
])
def test_dycoke_schedule_names_which_frames_are_pruned_against_which(frames, expected):
    from mmprune.methods.dycoke import pruned_frames

    assert pruned_frames(frames) == expected


def test_dycoke_keeps_the_least_similar_tokens_of_each_pruned_frame():
    from mmprune.methods.dycoke import merged_frames

    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(8 * 6, 5, generator=g)
    kept = merged_frames(embeds, 8, 2).tolist()
    grids = embeds.reshape(8, 6, 5)
    expected = []
    for t in range(8):
        reference = {1: 0, 3: 2, 5: 4, 7: 6, 2: 0}.get(t)
        if reference is None:
            expected += [t * 6 + p for p in range(6)]
            continue
        sims = [float(F.cosine_similarity(grids[t, p], grids[reference, p], dim=0)) for p in range(6)]
        least = sorted(range(6), key=lambda p: (sims[p], p))[:2]
        expected += [t * 6 + p for p in sorted(least)]
    assert kept == expected
    assert len(kept) == 3 * 6 + 5 * 2


@pytest.mark.parametrize("family", QWEN)
def test_dycoke_on_a_model_keeps_the_first_grid_and_prunes_the_second(family):
    model = tiny_model(family)
    pruner = mmprune.get("dycoke", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model.generate(**tiny.batch(family, [[2, ("img", 0), 3, ("vid", 1), 2]]), **GEN)
    sample = pruner.stats["samples"][0]
    video = sample["videos"][0]
    assert video["kept_per_frame"] == [24, 6] and video["after"] == 30  # int(0.25 * 24) of the second grid
    assert sample["images"][0]["after"] == sample["images"][0]["before"]
    with pytest.raises(ValueError, match="more tokens than a frame has"):
        with mmprune.get("dycoke", keep=30).attach(model), torch.no_grad():
            model(**tiny.batch(family, VIDEO))


@pytest.mark.parametrize("family, tokens", [("llava_next_video", 4 * 2 * 2), ("llava_onevision", 4 * 2 * 2 + 1)])
def test_llava_frames_helper_builds_inputs_the_model_fills(family, tokens):
    """4 frames of 30 x 40: NeXT-Video resizes the shortest edge to 32 and crops the centre (pooled 2x2 per frame);
    OneVision resizes to 32 x 32 (pooled to 2x2 after the projector, plus the trailing newline)."""
    import numpy as np
    from types import SimpleNamespace

    from mmprune.data.video import llava_video_inputs

    frames = np.random.RandomState(0).randint(0, 255, (4, 30, 40, 3)).astype(np.uint8)
    model = tiny_model(family)
    video = llava_video_inputs(frames, model.config, SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3))
    assert video["pixel_values_videos"].shape == (1, 4, 3, 32, 32) and video["video_tokens"] == tokens
    assert float(video["pixel_values_videos"].abs().max()) <= 1.0  # rescaled to [0, 1], then (x - 0.5) / 0.5
    count = video.pop("video_tokens")
    ids = torch.tensor([[5, 6] + [tiny.VIDEO_TOKEN] * count + [7, 8]])
    pruner = mmprune.get("evs", keep=0.5)
    with pruner.attach(model), torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **video, max_new_tokens=2, do_sample=False)
    assert pruner.stats["samples"][0]["videos"][0]["frames"] == [4, 2, 2]
