"""HiRED: the budget split between the full image and the anyres sub-images, the sub-image map of LLaVA-NeXT's
packed tokens, and the kept set on a tiny LLaVA-NeXT computed from eager attention."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

import mmprune
import tiny
from mmprune import upstream
from mmprune.media import MediaItem, Segment, Selection
from mmprune.methods.hired import allocate, partitions, proportional
from mmprune.models.llava_next import packed_segments

# a 4x4 base grid (16 patches, raster order) and four 2x2-tiled sub-images of 16 tokens each (no newlines: allocate
# only reads the partition map)
BASE = 16
PART = torch.cat([torch.zeros(BASE, dtype=torch.long), torch.arange(1, 5).repeat_interleave(16)])


def early(marked: list[int]) -> torch.Tensor:
    """Layer-0 scores over PART whose top 8 base patches are ``marked`` (sub-image tokens score nothing)."""
    scores = torch.zeros(PART.numel())
    scores[torch.tensor(marked, dtype=torch.long)] = torch.arange(len(marked), 0, -1, dtype=torch.float) + 1.0
    return scores


def test_sub_images_share_the_budget_by_layer0_marks_in_contiguous_chunks():
    """k = 20, alpha = 0.5: the full image takes int(20 * 0.5) = 10, the sub-images S = 10. The base's top
    int(16 * 0.5) = 8 layer-0 patches are marked; the 4 chunks are base rows 0..3 (4 raster patches each). Marks
    per chunk 4, 2, 2, 0 -> floors 5, 2, 2, 0 (sum 9); the one left goes to the largest remainder (chunks 1 and 2
    tie at .5: the earlier)."""
    marked = [0, 1, 2, 3, 4, 5, 8, 9]
    assert allocate(20, PART, 4, early(marked), alpha=0.5) == [10, 5, 3, 2, 0]


def test_chunks_are_raster_bands_not_quadrants():
    """alpha = 0.75 marks int(16 * 0.25) = 4 patches: the base's top-left 2x2 quadrant (0, 1, 4, 5). They fall in
    chunks 0 and 1 (base rows 0 and 1), so sub-images 0 and 1 share S = 20 - 15 = 5 (2.5 each: the tie to the
    earlier), although a quadrant split would give all of it to sub-image 0."""
    scores = torch.zeros(PART.numel())
    scores[torch.tensor([0, 1, 4, 5])] = 1.0
    assert allocate(20, PART, 4, scores, alpha=0.75) == [15, 3, 2, 0, 0]


def test_alpha_sets_the_full_image_share_and_how_many_base_patches_are_marked():
    """alpha = 0.25, k = 20: the full image takes int(5.0) = 5; int(16 * 0.75) = 12 marks (rows 0-2 whole) split
    S = 15 evenly over chunks 0-2."""
    scores = torch.zeros(PART.numel())
    scores[:12] = 1.0
    assert allocate(20, PART, 4, scores, alpha=0.25) == [5, 5, 5, 5, 0]


def test_shares_are_clamped_to_what_a_sub_image_holds_and_the_rest_goes_on():
    """Sub-image capacity (its tokens after unpadding) caps a share; what it cannot hold goes to the others by
    largest remainder, and what no sub-image holds to the full image."""
    assert proportional(10, [4, 2, 2, 0], [3, 16, 16, 16]) == [3, 4, 3, 0]
    small = torch.cat([torch.zeros(BASE, dtype=torch.long), torch.tensor([1, 1, 2, 2])])  # 2 tokens per sub-image
    scores = torch.zeros(small.numel())
    assert allocate(12, small, 2, scores, alpha=0.5) == [8, 2, 2]  # 6 + 4 sub-image tokens; 2 more to the base


def test_no_marked_patch_weighs_chunks_by_size():
    """alpha close to 1 marks int(16 * 0.01) = 0 patches (the reference divides by zero): chunks weigh by size."""
    assert allocate(20, PART, 4, early([]), alpha=0.99) == [16, 1, 1, 1, 1]


def test_the_split_follows_the_reference_floors_on_random_scores():
    """Against a transcription of the reference's float computation: every share is the reference's
    int(S * m_j / sum m) or one more (largest remainder), and the total is the budget."""
    g = torch.Generator().manual_seed(0)
    for k in (7, 20, 33, 50):
        scores = torch.rand(PART.numel(), generator=g)
        counts = allocate(k, PART, 4, scores, alpha=0.5)
        full = min(int(k * 0.5), BASE)
        rest = min(k - full, 64)
        marked = torch.zeros(BASE, dtype=torch.bool)
        marked[scores[:BASE].topk(int(BASE * 0.5)).indices] = True
        m = marked.reshape(2, 2, -1).sum(-1).reshape(-1).float()
        floors = torch.clamp((m / m.sum() * rest).int(), max=16).tolist()
        assert counts[0] == full and sum(counts) == k
        assert all(f <= c <= f + 1 for f, c in zip(floors, counts[1:])), (k, floors, counts)


def hf_crop_map(model, image_size) -> tuple[torch.Tensor, list[Segment]]:
    """(packed tokens,) crop of every packed token (-1: newline) by HF's own pack_image_features, and the
    segments mmprune builds for that image."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    crops = upstream.llava_next_crops(list(image_size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    crop_ids = torch.arange(crops, dtype=torch.float).repeat_interleave(side * side).view(crops, side * side, 1)
    packed, _ = model.model.pack_image_features([crop_ids], torch.tensor([image_size]), "default",
                                                image_newline=torch.tensor([-1.0]))
    crop = packed[0][:, 0].long()
    return crop, packed_segments(crop >= 0, side)


def clip_l_next() -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT's geometry (336 px crops of 24 x 24 patches, v1.6 pinpoints) on a tiny random model."""
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    cfg = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**tiny._text()),
                          image_token_id=tiny.IMAGE_TOKEN, vision_feature_layer=-1,
                          vision_feature_select_strategy="default",
                          image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    return LlavaNextForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("image_size", [(640, 480), (480, 640), (1000, 700), (700, 1000), (1200, 400), (400, 1200),
                                        (672, 672), (900, 600), (350, 1100)])
def test_sub_images_are_located_on_the_packed_grid_as_hf_packs_them(image_size):
    """Without the adapter's crop map, the tiles of the unpadded high-res grid are HF's crops (canvas padding under
    half a crop per side: images at least a crop in size in the padded direction)."""
    crop, segments = hf_crop_map(clip_l_next(), image_size)
    part, subimages = partitions(MediaItem(torch.zeros(crop.numel(), 1), segments))
    assert subimages == int(crop.max()) and torch.equal(part, crop)


def test_the_adapters_crop_map_is_used_when_offered():
    """A crop map the segments cannot tell (here: a 2 x 1 layout on a 4 x 4 high-res grid) wins over geometry."""
    segments = [Segment(0, 2, 2), Segment(4, 4, 4, newline=True)]
    crop = torch.zeros(24, dtype=torch.long)
    crop[segments[1].newline_indices()] = -1
    patches = segments[1].patch_indices()
    crop[patches[:2].reshape(-1)], crop[patches[2:].reshape(-1)] = 1, 2
    item = MediaItem(torch.zeros(24, 1), segments, lazy={"crop_index": lambda: crop})
    part, subimages = partitions(item)
    assert subimages == 2 and torch.equal(part, crop)


def next_inputs(image_size: tuple[int, int]) -> tuple[dict, int]:
    """One tiny LLaVA-NeXT image of ``image_size`` (5 crops of 32 px: pinpoint 64 x 64) between text tokens."""
    model = tiny_model("llava_next")
    crop, _ = hf_crop_map(model, image_size)
    n = crop.numel()
    ids = torch.tensor([[3, 5, 7] + [tiny.IMAGE_TOKEN] * n + [9, 11]])
    pixels = tiny.image_pixels("llava_next", 0)["pixel_values"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_sizes": torch.tensor([list(image_size)])}, n


def expected_next(model, inputs, k: int, alpha: float = 0.5) -> list[int]:
    """The reference's steps written out on eager attention: per crop, [CLS] rows summed over heads at layer 0
    (split) and the feature layer (attentions[-2] of the 3-layer tower: ranking); packed with HF's own
    pack_image_features."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attn = eager.model.vision_tower(inputs["pixel_values"][0], output_attentions=True).attentions
    first, late = attn[0][:, :, 0, 1:].sum(1), attn[-2][:, :, 0, 1:].sum(1)  # (5 crops, 16)
    crop, _ = hf_crop_map(model, tuple(inputs["image_sizes"][0].tolist()))
    late_packed, _ = model.model.pack_image_features([late.unsqueeze(-1)], inputs["image_sizes"], "default",
                                                     image_newline=torch.tensor([0.0]))
    late_packed = late_packed[0][:, 0]
    sizes = [int((crop == p).sum()) for p in range(5)]
    full = min(int(k * alpha), 16)
    rest = min(k - full, sum(sizes[1:]))
    marked = torch.zeros(16, dtype=torch.bool)
    marked[torch.argsort(first[0], descending=True, stable=True)[:int(16 * (1 - alpha))]] = True
    marks = marked.reshape(4, 4).sum(1).tolist()  # 4 chunks of 4 raster patches
    shares = [rest * m // sum(marks) for m in marks]
    for j in sorted(range(4), key=lambda j: (-(rest * marks[j] % sum(marks)), j))[:rest - sum(shares)]:
        shares[j] += 1  # largest remainder
    assert all(share <= size for share, size in zip(shares, sizes[1:])), "a case without clamps"
    kept = []
    for p, count in enumerate([full, *shares]):
        members = torch.nonzero(crop == p).reshape(-1)
        kept += members[torch.argsort(late_packed[members], descending=True, stable=True)[:count]].tolist()
    return sorted(kept)


@pytest.mark.parametrize("image_size, k", [((64, 64), 30), ((64, 64), 9), ((64, 40), 25), ((40, 64), 40)])
def test_llava_next_kept_set_is_the_reference_rule_on_eager_attention(image_size, k):
    model = tiny_model("llava_next")
    inputs, n = next_inputs(image_size)
    pruner = mmprune.get("hired", keep=k)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    image = pruner.stats["samples"][0]["images"][0]
    assert image["before"] == n and image["after"] == k
    assert image["kept"] == expected_next(model, inputs, k)


def test_llava_next_image_of_the_base_crop_alone_keeps_the_whole_budget_in_one_partition():
    """A full-image-only partition gets the whole budget (the LLaVA-1.5 variant), not int(T * alpha); the lone
    newline is not kept."""
    item = MediaItem(torch.zeros(17, 1), [Segment(0, 4, 4), Segment(16, 1, 0, newline=True)])
    part, subimages = partitions(item)
    assert subimages == 0 and part[16] == -1
    assert allocate(6, part, 0, None, alpha=0.5) == [6]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_towers_without_cls_rank_one_partition_by_the_received_attention_substitute(family):
    """No per-layer [CLS] rows: HiRED's one-partition rule on token_attention (heads summed), which ranks as
    FasterVLM's head-mean of the same field."""
    model = tiny_model(family)
    inputs = tiny.batch(family, [[3, ("img", 0), 4]])
    kept = {}
    for method in ("hired", "fastervlm"):
        pruner = mmprune.get(method, keep=7)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        kept[method] = pruner.stats["samples"][0]["images"][0]["kept"]
    assert kept["hired"] == kept["fastervlm"] and len(kept["hired"]) == 7


def test_bad_values_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"hired: alpha=1.5 is not valid: expected a number in \[0, 1\]"):
        mmprune.get("hired", alpha=1.5)
    with pytest.raises(ValueError, match=r"hired: early_layer=-1 is not valid"):
        mmprune.get("hired", early_layer=-1)
    model = tiny_model("llava_next")
    inputs, _ = next_inputs((64, 64))
    with pytest.raises(ValueError, match=r"hired: late_layer=3 is beyond the 3-layer vision tower: expected 0..2"):
        with mmprune.get("hired", late_layer=3).attach(model), torch.no_grad():
            model(**inputs)


@pytest.mark.parametrize("image_size", [(640, 480), (100, 300), (300, 100), (340, 700), (200, 500), (1000, 700)])
def test_the_llava_next_adapter_offers_hfs_crop_map(image_size):
    """The adapter's ``crop_index`` is HF's packing of each token's crop, also where the unpadded grid's geometry is
    ambiguous (small images upscaled into a padded canvas)."""
    from mmprune.methods.base import PreLLMPruner

    seen = []

    class Probe(PreLLMPruner):
        name = "probe"

        def select(self, tokens, k):
            seen.append(tokens.get("crop_index"))
            return Selection.of(torch.arange(k))

    model = clip_l_next()
    crop, _ = hf_crop_map(model, image_size)
    ids = torch.tensor([[3] + [tiny.IMAGE_TOKEN] * crop.numel() + [9]])
    crops = upstream.llava_next_crops(list(image_size), model.config.image_grid_pinpoints, 336)
    pixels = torch.randn(1, crops, 3, 336, 336)
    with Probe(keep=0.5).attach(model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
              image_sizes=torch.tensor([list(image_size)]))
    assert torch.equal(seen[0].cpu(), crop)
