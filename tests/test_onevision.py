"""LLaVA-OneVision: the layout of its anyres-max images and pooled videos, and the SigLIP encoder scores.

The contract tests (keep=1.0 exact, padded batch = each sample alone, KV = text + kept) run on it with every other
family (conftest's FAMILIES); its videos go through tests/test_video.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny

FAMILY = "llava_onevision"


def image_stats(inputs: dict, method: str = "fastv", **kwargs) -> dict:
    model = tiny_model(FAMILY)
    pruner = mmprune.get(method, keep=kwargs.pop("keep", 0.5), **kwargs)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    return pruner.stats


def test_images_follow_the_anyres_max_packing_with_newlines():
    """64x64: base 4x4, then the 8x8 high-res grid shrunk to 4x4 (anyres_max_1), a newline after each row;
    32x64: base 4x4, then 4x8 shrunk to 2x5."""
    stats = image_stats(tiny.batch(FAMILY, [[2, ("img", 0), 3], [1, ("img", 1), 2]]))
    first, second = (sample["images"][0] for sample in stats["samples"])
    assert first["segments"] == [[0, 4, 4, False], [16, 4, 4, True]] and first["before"] == 36
    assert second["segments"] == [[0, 4, 4, False], [16, 2, 5, True]] and second["before"] == 28


def test_a_sample_with_several_images_encodes_each_as_its_base_crop():
    """batch_num_images > 1: each image is its base crop and one newline (17 tokens), as the model decides."""
    inputs = tiny.batch(FAMILY, [[2, ("img", 0), 1, ("img", 1), 2]])
    single = 17
    ids = inputs["input_ids"][0].tolist()
    ids = [t for t in ids if t != tiny.IMAGE_TOKEN]
    ids = ids[:2] + [tiny.IMAGE_TOKEN] * single + ids[2:3] + [tiny.IMAGE_TOKEN] * single + ids[3:]
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["batch_num_images"] = torch.tensor([2])
    model = tiny_model(FAMILY)
    with torch.no_grad():
        reference = model(**inputs).logits
    pruner = mmprune.get("uniform", keep=1.0)
    with pruner.attach(model), torch.no_grad():
        same = model(**inputs).logits
    torch.testing.assert_close(same, reference)
    images = pruner.stats["samples"][0]["images"]
    assert [image["segments"] for image in images] == [[[0, 4, 4, False], [16, 1, 0, True]]] * 2


def _eager_received(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(crops, heads, 16) attention each patch receives, mean over the queries of its crop, at the last SigLIP
    layer (the feature layer -1), from the tower's own eager attention weights."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    return attentions[-1].mean(dim=2)


@pytest.mark.parametrize("image_id, k", [(0, 20), (1, 9)])
def test_fastervlm_scores_received_attention_packed_like_the_embeddings(image_id, k):
    """SigLIP has no [CLS]: the score is the attention a patch receives (mean over queries and heads), laid out
    through the model's own pack_image_features, so the shrunk high-res grid gets the bilinear blend of its
    patches' scores; newline tokens are never kept."""
    model = tiny_model(FAMILY)
    inputs = tiny.batch(FAMILY, [[2, ("img", image_id), 3]])
    crops = 5 if image_id == 0 else 3
    scores = _eager_received(model, inputs["pixel_values"][0, :crops]).mean(dim=1).unsqueeze(-1)
    packed, _ = model.model.pack_image_features([scores], inputs["image_sizes"], image_newline=torch.zeros(1),
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    values = packed[0][:, 0]
    stats = image_stats(inputs, "fastervlm", keep=k)
    image = stats["samples"][0]["images"][0]
    _, rows, cols, _ = image["segments"][1]
    newlines = [16 + row * (cols + 1) + cols for row in range(rows)]
    values[newlines] = float("-inf")
    assert image["kept"] == sorted(values.topk(k).indices.tolist())


def test_videos_are_pooled_frames_closed_by_one_newline():
    model = tiny_model(FAMILY)
    pruner = mmprune.get("uniform", keep=9)
    with pruner.attach(model), torch.no_grad():
        model.generate(**tiny.batch(FAMILY, [[2, ("vid", 0), 3]]), max_new_tokens=2, do_sample=False)
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["frames"] == [8, 2, 2] and video["before"] == 33
    assert video["segments"][-1] == [32, 1, 0, True]  # the trailing newline belongs to the video item
    assert 32 not in video["kept"]  # uniform keeps patches only (no image content in a newline)
    assert sum(video["kept_per_frame"]) == video["after"] == 9


@pytest.mark.parametrize("method", ["evs", "dycoke"])
def test_temporal_methods_keep_the_trailing_newline(method):
    model = tiny_model(FAMILY)
    pruner = mmprune.get(method, keep=0.5)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(FAMILY, [[2, ("vid", 1), 3]]))
    video = pruner.stats["samples"][0]["videos"][0]
    assert video["kept"][-1] == 32 and video["after"] < video["before"]
    assert video["kept_per_frame"][0] == 4  # the first frame whole under both rules
