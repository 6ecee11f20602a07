"""InternVL3: an image is its run of tiles (thumbnail last), [CLS] attention per tile summed over each token's four
pixel-shuffled patches, and the pre-projector features the projector really reads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import record_selects, tiny_model

import mmprune
import tiny


def eager_cls_rows(model, pixel_values):
    """Each tile's head-mean [CLS] attention row over its patches at the last InternViT layer, eager attention."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values=pixel_values, output_attentions=True)
    return out.attentions[-1][:, :, 0, 1:].mean(1)  # (tiles, 64 patches)


def token_sums(rows):
    """(tiles, 64) patch values of an 8 x 8 grid -> (tiles, 16) tokens: the sum over each 2 x 2 block."""
    return rows.view(-1, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(rows.shape[0], 16)


def test_an_image_is_its_tiles_with_the_thumbnail_as_crop_zero(monkeypatch):
    model = tiny_model("internvl")
    seen = record_selects(monkeypatch, mmprune.METHODS["fastervlm"])
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("internvl", [[3, ("img", 0), 2, ("img", 1), 4]]))
    one, three = (tokens for tokens, _ in seen)
    assert [one.num_tokens, three.num_tokens] == [16, 48] and [k for _, k in seen] == [4, 12]
    assert [(s.start, s.rows, s.cols) for s in three.segments] == [(0, 4, 4), (16, 4, 4), (32, 4, 4)]
    assert three.get("crop_index").tolist() == [1] * 16 + [2] * 16 + [0] * 16
    assert one.get("crop_index").tolist() == [0] * 16
    images = pruner.stats["samples"][0]["images"]
    assert [(i["before"], i["after"]) for i in images] == [(16, 4), (48, 12)]


def test_fastervlm_keeps_the_tokens_whose_patches_draw_most_cls_attention():
    model = tiny_model("internvl")
    inputs = tiny.batch("internvl", [[3, ("img", 1), 4]])
    pruner = mmprune.get("fastervlm", keep=12)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    scores = token_sums(eager_cls_rows(model, inputs["pixel_values"])).reshape(-1)  # tile after tile
    assert pruner.stats["samples"][0]["images"][0]["kept"] == sorted(scores.topk(12).indices.tolist())


def test_vision_features_are_what_the_projector_reads(monkeypatch):
    model = tiny_model("internvl")
    seen = record_selects(monkeypatch, mmprune.METHODS["visionzip"])
    with mmprune.get("visionzip", keep=8).attach(model), torch.no_grad():
        model(**tiny.batch("internvl", [[3, ("img", 1), 4]]))
    tokens = seen[0][0]
    assert tokens.get("vision_features").shape == (48, 128) and not tokens.has("cls_feature")
    torch.testing.assert_close(tokens.project(tokens.get("vision_features")), tokens.embeds)


def test_image_tokens_that_are_not_whole_tiles_are_refused():
    model = tiny_model("internvl")
    split = [3] + [tiny.IMAGE_TOKEN] * 20 + [5] + [tiny.IMAGE_TOKEN] * 28 + [4]  # text inside a tile's run
    inputs = {"input_ids": torch.tensor([split]), "attention_mask": torch.ones(1, len(split), dtype=torch.long),
              **tiny.image_pixels("internvl", 1)}
    with pytest.raises(ValueError, match="one run of whole tiles"):
        with mmprune.get("fastervlm", keep=0.25).attach(model), torch.no_grad():
            model(**inputs)
