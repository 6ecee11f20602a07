"""Batched chat inputs (``mmprune.data.inputs``): requests from chat messages, left-padded batches that hold each
request's own inputs, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmprune.bench.accuracy import prompts
from mmprune.data import synthetic
from mmprune.data.inputs import Request, model_inputs
from mmprune.loading import load
from mmprune.zoo import SHIPPED_MODEL
from mmprune.zoo.tiny_random import build_tiny_llava_onevision, build_tiny_qwen2_vl


def frames(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load(str(build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "qwen2_vl")))


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return load(str(build_tiny_llava_onevision(tmp_path_factory.mktemp("ov") / "onevision")))


def test_request_from_chat_reads_images_and_samples_videos(tmp_path):
    path = tmp_path / "cat.png"
    frames(1)[0].save(path)
    clip = frames(10)
    request = Request.from_chat([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "and"},
                                     {"type": "video", "video": clip, "video_start": 1.0, "video_end": 3.0}]},
    ], fps=2.0, max_frames=3)
    assert request.messages == [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                             {"type": "video"}]}]
    assert np.array_equal(np.asarray(request.images[0]), np.asarray(Image.open(path)))
    # frames 2..6 lie in [1 s, 3 s] at 2 fps; three of them, evenly spaced, are kept
    assert [np.asarray(f).tobytes() for f in request.videos[0]] == [np.asarray(clip[i]).tobytes() for i in (2, 4, 6)]


@pytest.mark.parametrize(("part", "message"), [
    ({"type": "audio", "audio": "a.wav"}, "a 'audio' item in a chat message"),
    ({"type": "video", "video": frames(2), "video_start": 5.0}, "video span 5.0-None s holds no frame"),
])
def test_request_from_chat_refuses_what_it_cannot_build(part, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Request.from_chat([{"role": "user", "content": [part]}])


def test_processor_batch_is_the_processors_left_padded_call():
    model, processor = load(str(SHIPPED_MODEL))
    samples = synthetic.generate(3, seed=1)
    questions = [s.question for s in samples]
    got = model_inputs(model, processor, [Request.of(q, [s.image]) for q, s in zip(questions, samples)])
    want = processor(text=prompts(processor, questions), images=[s.image for s in samples], padding=True,
                     return_tensors="pt")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (got["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column


def test_qwen_batch_holds_each_requests_own_inputs(qwen):
    model, processor = qwen
    requests = [Request.of("what is it", frames(2, seed=1)), Request.of("is it red", [], [frames(4, seed=2)]),
                Request.of("and this", frames(1, seed=3), [frames(2, seed=4)])]
    batch = model_inputs(model, processor, requests)
    alone = [model_inputs(model, processor, [r]) for r in requests]
    width = batch["input_ids"].shape[1]
    pad = processor.tokenizer.pad_token_id
    for row, single in enumerate(alone):
        ids = single["input_ids"][0]
        padding = width - ids.numel()
        assert torch.equal(batch["input_ids"][row, padding:], ids) and (batch["input_ids"][row, :padding] == pad).all()
        assert batch["attention_mask"][row].tolist() == [0] * padding + [1] * ids.numel()
        assert torch.equal(batch["mm_token_type_ids"][row, padding:], single["mm_token_type_ids"][0])
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], torch.cat([s[key] for s in alone if key in s]))
    for key in ("pixel_values_videos", "video_grid_thw"):
        assert torch.equal(batch[key], torch.cat([s[key] for s in alone if key in s]))
    image_token, video_token = model.config.image_token_id, model.config.video_token_id
    assert (batch["input_ids"] == image_token).sum().item() == sum(
        int(g.prod()) // 4 for g in batch["image_grid_thw"])
    assert (batch["input_ids"] == video_token).sum().item() == sum(
        int(g.prod()) // 4 for g in batch["video_grid_thw"])


def test_llava_video_batch_pads_prompts_and_stacks_clips(onevision):
    model, processor = onevision
    requests = [Request.of("what happens", [], [frames(2, seed=1)]), Request.of("why", [], [frames(2, seed=2)])]
    batch = model_inputs(model, processor, requests)
    assert batch["pixel_values_videos"].shape[:2] == (2, 2)
    counts = (batch["input_ids"] == model.config.video_token_id).sum(1).tolist()
    assert counts[0] == counts[1] == 2 * 4 + 1  # two frames of ceil(4 / 2) ** 2 pooled tokens, one newline
    assert (batch["attention_mask"][:, -1] == 1).all()


@pytest.mark.parametrize(("requests", "message"), [
    ([Request.of("a", [], [frames(2)]), Request.of("b", [], [frames(3)])], "need the same frame count, got 2, 3"),
    ([Request.of("a", frames(1), [frames(2)])], "one video and no image per prompt"),
])
def test_llava_video_batch_refusals(onevision, requests, message):
    with pytest.raises(ValueError, match=message):
        model_inputs(*onevision, requests)


def test_video_on_an_image_only_family_is_refused():
    model, processor = load(str(SHIPPED_MODEL))
    with pytest.raises(ValueError, match="video prompts are built for Qwen2-VL/Qwen2.5-VL and "
                                         "LLaVA-OneVision/LLaVA-NeXT-Video models; LlavaForConditionalGeneration"):
        model_inputs(model, processor, [Request.of("what happens", [], [frames(2)])])


def test_import_mmprune_imports_no_integration():
    import subprocess
    import sys

    code = ("import sys, mmprune, mmprune.cli, mmprune.bench.accuracy; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmms_eval', 'vllm', 'datasets') "
            "or m.startswith('mmprune.integrations')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_qwen_video_frames_are_sized_within_the_saved_video_processor_bounds(tmp_path):
    import json

    folder = build_tiny_qwen2_vl(tmp_path / "qwen")
    model, processor = load(str(folder))
    assert processor.video_size is None  # no video config saved: frames keep their size (rounded to 8 px)
    unbounded = model_inputs(model, processor, [Request.of("why", [], [frames(2, size=64)])])
    assert unbounded["video_grid_thw"].tolist() == [[1, 16, 16]]  # 64 px / 4 px patches
    # max 32 x 32 pixels per frame: smart_resize halves each side of 64 x 64 (4096 px), in multiples of 4 x 2 px
    (folder / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64,
                                                                                 "longest_edge": 32 * 32}}))
    model, processor = load(str(folder))
    assert processor.video_size == {"shortest_edge": 64, "longest_edge": 1024}
    bounded = model_inputs(model, processor, [Request.of("why", [], [frames(2, size=64)])])
    assert bounded["video_grid_thw"].tolist() == [[1, 8, 8]]
    assert (bounded["input_ids"] == model.config.video_token_id).sum().item() == 8 * 8 // 4
