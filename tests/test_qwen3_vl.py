"""Qwen3-VL: its MoE variant through the same adapter, and videos whose grids sit in separate timestamped spans.
The dense model runs the whole family suite (conftest's FAMILIES)."""

from __future__ import annotations

import torch
from conftest import tiny_model

import mmprune
import tiny


def moe_model():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    dense = tiny_model("qwen3_vl").config
    text = dict(dense.text_config.to_dict(), moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                decoder_sparse_step=1)
    text.pop("model_type", None)
    cfg = Qwen3VLMoeConfig(vision_config=dense.vision_config.to_dict(), text_config=text,
                           image_token_id=tiny.IMAGE_TOKEN, video_token_id=tiny.VIDEO_TOKEN,
                           vision_start_token_id=tiny.VISION_START, vision_end_token_id=tiny.VISION_END)
    return Qwen3VLMoeForConditionalGeneration(cfg).eval()


def test_the_moe_variant_prunes_through_the_same_adapter():
    model = moe_model()
    inputs = tiny.batch("qwen3_vl", [[2, ("img", 0), 3, ("vid", 1), 2], [1, ("img", 1), 4]])
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with mmprune.get("fastv", keep=1.0).attach(model), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), reference)
    pruner = mmprune.get("fastv", keep=0.5)
    with pruner.attach(model), torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert pruner.stats["family"] == "qwen3-vl"
    assert pruner.stats["samples"][0]["tokens_per_layer_by_modality"]["video"] == [48, 48, 24, 24]


def test_a_videos_grids_in_separate_spans_keep_their_slots():
    """Each grid follows its timestamp in its own vision span; a pure selection keeps every token in its slot, so
    the timestamps stay between the grids' survivors."""
    model = tiny_model("qwen3_vl")
    inputs = tiny.batch("qwen3_vl", [[2, ("vid", 0), 3]])
    seen = []
    pruner = mmprune.get("uniform", keep=8)
    with pruner.attach(model), torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["kept_per_frame"] == [4, 4]
    assert seen == [inputs["input_ids"].shape[1] - 32 + 8]
