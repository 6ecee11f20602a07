"""Qwen3-VL: its MoE variant through the same adapter, videos whose grids sit in separate timestamped spans, and
DeepStack (shared with the Qwen3-Omni thinker's vision tower). The dense model runs the whole family suite
(conftest's FAMILIES)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny

DEEPSTACK = ["qwen3_vl", "qwen3_omni"]  # families whose vision tower feeds DeepStack


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


@pytest.mark.parametrize("family", DEEPSTACK)
def test_deepstack_features_follow_the_kept_visual_tokens(family):
    """The decoder receives DeepStack rows only for the visual tokens that entered it, in order, and its visual
    mask marks exactly their positions (computed here from the kept indices of the stats)."""
    model = tiny_model(family)
    inputs = tiny.batch(family, [[2, ("img", 0), 3, ("vid", 1), 2], [1, ("img", 1), 4]])
    seen = []

    def run() -> None:  # what the decoder receives (hooked after mmprune's own hook)
        lm = model.model.language_model
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(
            (k["visual_pos_masks"].clone(), [f.clone() for f in k["deepstack_visual_embeds"]])), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()

    run()
    pruner = mmprune.get("random", keep=0.5)
    with pruner.attach(model):
        run()
    (full_mask, full_rows), (mask, rows) = seen
    kept_rows, offset = [], 0  # the full-prompt row of every kept visual token, in sequence order
    for sample, stats in enumerate(pruner.stats["samples"]):
        ids = inputs["input_ids"][sample]
        visual = torch.nonzero(full_mask[sample]).reshape(-1).tolist()  # positions of the row's visual tokens
        kept = set()
        for token, key in ((tiny.IMAGE_TOKEN, "images"), (tiny.VIDEO_TOKEN, "videos")):
            spans = iter(torch.nonzero(ids == token).reshape(-1).tolist())
            for entry in stats[key]:
                item = [next(spans) for _ in range(entry["before"])]
                kept |= {item[k] for k in entry["kept"]}
        kept_rows += [offset + ordinal for ordinal, position in enumerate(visual) if position in kept]
        offset += len(visual)
    assert len(kept_rows) < int(full_mask.sum())
    assert int(mask.sum()) == len(kept_rows) == sum(e["after"] for s in pruner.stats["samples"]
                                                   for e in s["images"] + s["videos"])
    for full, pruned in zip(full_rows, rows):
        torch.testing.assert_close(pruned, full[kept_rows])


@pytest.mark.parametrize("family", DEEPSTACK)
def test_a_stage_inside_the_deepstack_layers_is_refused(family):
    tiny_model(family)  # skips the Omni thinker on releases before its standard layout
    model = tiny.BUILDERS[family](deepstack=(0, 1))  # DeepStack adds features after decoder layers 0 and 1
    name = family.replace("_", "-")
    with pytest.raises(ValueError, match=rf"fastv: a stage at layer 1 is inside the DeepStack layers 0..1 of {name}"):
        with mmprune.get("fastv", layer=1).attach(model), torch.no_grad():
            model(**tiny.batch(family, [[2, ("img", 0), 3]]))
    with mmprune.get("fastv", layer=2).attach(model), torch.no_grad():
        model(**tiny.batch(family, [[2, ("img", 0), 3]]))  # after them: allowed
