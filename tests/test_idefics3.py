"""Idefics3 / SmolVLM: an image is its split tiles plus its global image (found from the prompt's tile markers),
received attention per tile summed over each token's pixel-shuffled patches, the pre-projection features the
connector really reads, and padded tiles handled as the model handles them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import record_selects, tiny_model

import mmprune
import tiny
from mmprune import upstream
from mmprune.models import adapter_for

FAMILIES = list(tiny.IDEFICS3_FAMILIES)


def eager_copy(model):
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return eager


def eager_received(model, tiles, patch_mask=None, layer=-1):
    """Each tile's head-mean attention received per patch at an encoder layer, eager attention: the column mean of
    the attention weights over the tile's real patches' queries."""
    with torch.no_grad():
        out = eager_copy(model).model.vision_model(pixel_values=tiles, patch_attention_mask=patch_mask,
                                                   output_attentions=True)
    weights = out.attentions[layer].mean(1)  # (tiles, P queries, P keys)
    real = (torch.ones(weights.shape[:2], dtype=torch.bool) if patch_mask is None
            else patch_mask.reshape(weights.shape[0], -1))
    return torch.stack([w[r].mean(0) for w, r in zip(weights, real)])  # (tiles, P)


def token_sums(received, scale):
    """(tiles, P) patch values of a square grid -> (tiles, T): the sum over each token's scale x scale block (tokens
    and the patches of a block in row-major order)."""
    tiles, patches = received.shape
    side = int(patches ** 0.5) // scale
    return received.view(tiles, side, scale, side, scale).sum(dim=(2, 4)).reshape(tiles, side * side)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_is_its_tiles_plus_its_global_image_as_crop_zero(monkeypatch, family):
    model = tiny_model(family)
    seen = record_selects(monkeypatch, mmprune.METHODS["fastervlm"])
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(family, [[3, ("img", 0), 2, ("img", 1), 4]]))
    one, three = (tokens for tokens, _ in seen)
    assert [one.num_tokens, three.num_tokens] == [16, 48] and [k for _, k in seen] == [4, 12]
    assert [(s.start, s.rows, s.cols) for s in three.segments] == [(0, 4, 4), (16, 4, 4), (32, 4, 4)]
    assert three.get("crop_index").tolist() == [1] * 16 + [2] * 16 + [0] * 16
    assert one.get("crop_index").tolist() == [0] * 16 and one.grid == (4, 4)
    images = pruner.stats["samples"][0]["images"]
    assert [(i["before"], i["after"]) for i in images] == [(16, 4), (48, 12)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fastervlm_keeps_the_tokens_whose_patches_receive_most_attention(family):
    """[CLS]-free: the score is the attention each patch receives (mean over the tile's queries, last layer),
    summed over the token's patches, tile after tile (the global image last)."""
    model = tiny_model(family)
    inputs = tiny.batch(family, [[3, ("img", 1), 4]])
    pruner = mmprune.get("fastervlm", keep=12)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    scores = token_sums(eager_received(model, inputs["pixel_values"][0]), model.config.scale_factor).reshape(-1)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == sorted(scores.topk(12).indices.tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layers_received_attention_is_the_eager_one(monkeypatch, family):
    model = tiny_model(family)
    inputs = tiny.batch(family, [[3, ("img", 1), 4]])
    seen = record_selects(monkeypatch, mmprune.METHODS["hiprune"])
    with mmprune.get("hiprune", keep=12).attach(model), torch.no_grad():
        model(**inputs)
    tokens = seen[0][0]
    layers = tokens.get("received_attention_by_layer")
    assert len(layers) == 2
    for layer in range(2):
        expected = token_sums(eager_received(model, inputs["pixel_values"][0], layer=layer),
                              model.config.scale_factor).reshape(-1)
        torch.testing.assert_close(layers[layer].mean(0), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layers[-1], tokens.get("received_attention"))


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_features_are_what_the_connector_reads(monkeypatch, family):
    model = tiny_model(family)
    read = []
    handle = model.model.connector.modality_projection.register_forward_pre_hook(lambda m, a: read.append(a[0]))
    seen = record_selects(monkeypatch, mmprune.METHODS["visionzip"])
    try:
        with mmprune.get("visionzip", keep=8).attach(model), torch.no_grad():
            model(**tiny.batch(family, [[3, ("img", 1), 4]]))
    finally:
        handle.remove()
    tokens = seen[0][0]
    width = model.config.vision_config.hidden_size * model.config.scale_factor ** 2
    assert tokens.get("vision_features").shape == (48, width) and not tokens.has("cls_feature")
    torch.testing.assert_close(tokens.get("vision_features"), read[0].reshape(-1, width))
    torch.testing.assert_close(tokens.project(tokens.get("vision_features")), tokens.embeds)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_batch_of_different_tile_counts_groups_each_samples_tiles(monkeypatch, family):
    """Sample 0's one tile is padded with two all-zero tiles, which the model drops: the items are sample 0's
    image and sample 1's three tiles, each selecting what it selects alone."""
    model = tiny_model(family)
    samples = [[3, ("img", 0), 4], [2, ("img", 1), 3]]
    inputs = tiny.batch(family, samples)
    assert inputs["pixel_values"].shape[:2] == (2, 3)
    assert inputs["pixel_attention_mask"].flatten(2).any(-1).tolist() == [[True, False, False], [True] * 3]
    seen = record_selects(monkeypatch, mmprune.METHODS["fastervlm"])
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
        together = [[i["kept"] for i in sample["images"]] for sample in pruner.stats["samples"]]
        assert [(tokens.sample, tokens.num_tokens) for tokens, _ in seen] == [(0, 16), (1, 48)]
        alone = []
        for sample in samples:
            model(**tiny.batch(family, [sample]))
            alone.append([i["kept"] for i in pruner.stats["samples"][0]["images"]])
    assert together == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_patches_are_masked_as_the_tower_masks_them(monkeypatch, family):
    """A tile whose lower rows are padding (pixel_attention_mask 0): those patches receive no attention, the
    others' received attention is the eager tower's under the same patch mask."""
    model = tiny_model(family)
    inputs = tiny.batch(family, [[3, ("img", 1), 4]])
    px, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    inputs["pixel_attention_mask"][0, 2, px - 2 * patch:] = 0  # the global image's last two patch rows
    seen = record_selects(monkeypatch, mmprune.METHODS["fastervlm"])
    with mmprune.get("fastervlm", keep=12).attach(model), torch.no_grad():
        model(**inputs)
    side = px // patch
    patch_mask = torch.ones(3, side, side, dtype=torch.bool)
    patch_mask[2, side - 2:] = False
    expected = eager_received(model, inputs["pixel_values"][0], patch_mask)
    assert bool((expected[2].view(side, side)[side - 2:] == 0).all())
    torch.testing.assert_close(seen[0][0].token_attention.mean(0),
                               token_sums(expected, model.config.scale_factor).reshape(-1), rtol=1e-4, atol=1e-6)


def test_the_grouping_rule_reads_the_markers_around_each_tile():
    adapter = adapter_for(tiny_model("idefics3"))
    ids = tiny.batch("idefics3", [[3, ("img", 1), 2, ("img", 0), ("img", 1), 4], [("img", 0), 1]])["input_ids"]
    assert adapter.tiles_per_image(ids, 16) == [3, 1, 3, 1]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda ids: ids[ids != tiny.FAKE_AROUND_IMAGE], "do not follow <fake_token_around_image>"),
    (lambda ids: torch.cat([ids[:13], torch.tensor([5]), ids[13:]]), "a run of 8 image tokens"),  # a tile cut
    (lambda ids: ids[:-5], "end with image tokens"),
])
def test_a_prompt_that_does_not_lay_out_tiles_as_the_processor_is_refused(edit, message):
    model = tiny_model("idefics3")
    inputs = tiny.batch("idefics3", [[3, ("img", 1), 4]])
    ids = edit(inputs["input_ids"][0])
    run = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
           "pixel_values": inputs["pixel_values"]}
    with mmprune.get("fastervlm", keep=0.25).attach(model), torch.no_grad():
        with pytest.raises(ValueError, match=message):
            model(**run)


def test_samples_that_disagree_on_the_global_image_marker_are_refused():
    model = tiny_model("idefics3")
    inputs = tiny.batch("idefics3", [[3, ("img", 0), 4], [3, ("img", 0), 4]])
    inputs["input_ids"][1][inputs["input_ids"][1] == tiny.GLOBAL_IMAGE] = 5
    with mmprune.get("fastervlm", keep=0.25).attach(model), torch.no_grad():
        with pytest.raises(ValueError, match="the tokens around the samples' last image-token runs disagree"):
            model(**inputs)


def test_the_decoder_is_the_text_model():
    model = tiny_model("smolvlm")
    adapter = adapter_for(model)
    assert adapter.family == "idefics3" and adapter.language_model is model.model.text_model
    assert upstream.multimodal_decoder(model.model) is model.model.text_model
