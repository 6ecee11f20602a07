"""HiPrune: anchor tokens by a middle encoder layer's attention, their spatial neighbours (buffers), and register
tokens by the feature layer's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner, check_encoder_layer
from mmprune.methods.params import Choice, Float, Int, param

REFERENCE_OBJECT_LAYER, REFERENCE_DEPTH = 9, 24  # HIPRUNE_OBJECT_LAYER's default for CLIP ViT-L (24 layers)
BUFFERS = ("flat", "grid")


def object_layer(layer: int | None, depth: int) -> int:
    """The 1-based encoder layer that picks the anchors: ``layer``, or the code's 9 of CLIP-L's 24 scaled to a
    ``depth``-layer tower (at least 1)."""
    return max(1, round(REFERENCE_OBJECT_LAYER * depth / REFERENCE_DEPTH)) if layer is None else layer


@dataclass
class HiPrunePruner(PreLLMPruner):
    """HiPrune: anchors (top tokens of a middle "object" layer), buffers (their spatial neighbours) and registers
    (top remaining tokens of the deep feature layer), scored by the attention each token *receives* in the vision
    encoder.

    Paper: "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models"
    (arXiv 2508.00553, 2025); reference code Danielement321/HiPrune (LLaVA-1.5 / LLaVA-NeXT:
    ``LLaVA/llava/model/llava_arch.py`` ``encode_images``, attentions from ``multimodal_encoder/clip_encoder.py``;
    Qwen2.5-VL: ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``).

    Rule (as the code, LLaVA-1.5), per image with budget ``k`` (``HIPRUNE_RETENTION``):
      * Score of a patch at a layer = its column of the eager attention probabilities, **mean over heads and over
        every query** ([CLS]'s query included), [CLS]'s column dropped ("global attention"; the [CLS]-row variant is
        commented out in the code).
      * Anchors: the top ``a = round(k * alpha / 5)`` patches (Python's round) by the score at the object layer
        ``HIPRUNE_OBJECT_LAYER = 9`` (1-based: ``attentions[8]`` of CLIP-L's 24 layers; the README calls layers
        5-9 "middle"). ``alpha = 0.1`` by default.
      * Buffers: each anchor's raster-index neighbours ``i - 1, i + 1, i - 24, i + 24`` (4 per anchor), clamped to
        ``[0, 575]``: on the grid's left / right edge ``i +- 1`` wraps to the previous / next row, above the top or
        below the bottom row the clamp yields patch 0 or 575. Duplicates are merged (``torch.unique``).
      * Registers: the remaining ``k - |anchors and buffers|`` slots go to the top patches by the score at the
        vision feature layer (``attentions[mm_vision_select_layer]`` = ``attentions[-2]``, the layer whose output
        the projector reads), anchors and buffers excluded.
      * The kept indices are sorted back to their original order. Defaults: ``alpha = 0.1``, object layer 9,
        ``k`` = 192 / 128 / 64 of 576 (here ``keep``, a count or a fraction).

    Here:
      * Scores are recomputed from each encoder layer's hooked attention input (the tower keeps its attention
        implementation; the code asks for ``output_attentions``), in float32, through the adapter's
        ``received_attention_by_layer`` (object layer) and ``received_attention`` (feature layer) fields.
      * ``object_layer`` (1-based, as the code's variable) defaults to 9 of 24 scaled to the tower's depth,
        ``max(1, round(9 L / 24))``: 9 on CLIP-L, 1 on the 3-layer test tower. The Qwen2.5-VL code uses layer 16
        of 32 and the last layer for registers, but no per-layer attention is read on Qwen here (below).
      * ``buffer="flat"`` (default) is the code's raster-index neighbourhood above, applied on each grid of the
        image with its own width and clamped to that grid; ``buffer="grid"`` takes the in-grid 4-connected 2-D
        neighbours (left, right, up, down) instead, with no wrap and no clamp (an edge anchor has fewer buffers).
      * Exactly ``k`` tokens: the kept set is the first ``k`` distinct tokens of the list anchors (best first),
        then their left, right, upper, lower neighbours (all anchors' left ones first, as the code concatenates),
        then every patch by feature-layer score. Where the code works this is its set; where anchors and buffers
        alone exceed ``k`` (``alpha`` near 1 with a small ``k``, where the code's negative ``topk`` fails) the
        list is cut there.
      * Ties go to the earlier token (``torch.topk`` leaves them unspecified); batches of any size.
      * LLaVA-NeXT: the code prunes every crop (base and each anyres crop) separately with ``k / crops`` tokens
        and packs them without unpadding or newline tokens (its merge type is hard-coded to ``spatial``). Here
        the budget is global over the image's tokens (the 2880 -> 640/320/160 convention, newlines counted):
        every packed token is scored by its own crop's attention, ``a = round(k * alpha / 5)`` anchors are taken
        over the whole image, neighbours are found on the packed grids (the base grid, and the unpadded high-res
        grid, whose neighbours may lie in an adjacent crop), and newline tokens are never kept unless ``k``
        exceeds the patches.
      * Towers without [CLS] and without per-layer fields (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision): both anchors
        and registers are ranked by the family's ``token_attention``, the attention each token receives at the
        scored layer (Qwen: the last vision block, averaged over the 2x2 merge unit, as the code's register score;
        OneVision: the feature layer), so ``object_layer`` is not used there: anchors are the top tokens of that
        score and buffers their neighbours on the merged grid. The Qwen2.5-VL code also takes one budget
        (``round(n * HIPRUNE_QWEN_RETENTION)``) over all images of a prompt with the first image's width; here each
        image has its own. Videos are refused (the code prunes images only).
    """

    keep: int | float = 0.25
    alpha: float = param(0.1, Float(0.0, 1.0),
                         "anchor share: round(keep * alpha / 5) anchors, each with up to 4 buffer neighbours")
    object_layer: int | None = param(None, Int(1, optional=True),
                                     "1-based encoder layer ranking the anchors (default: 9 of 24, scaled to the "
                                     "tower's depth)")
    buffer: str = param("flat", Choice(options=BUFFERS),
                        "buffer neighbours: 'flat' = the code's raster index +-1, +-width clamped to the grid; "
                        "'grid' = the in-grid 2-D 4-neighbours")

    encoder_fields: ClassVar[tuple[str, ...]] = ("received_attention_by_layer",)
    name: ClassVar[str] = "hiprune"
    summary: ClassVar[str] = ("anchors by a middle encoder layer's attention, their neighbours, and registers by the "
                              "feature layer's attention (HiPrune)")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        if tokens.has("received_attention_by_layer"):
            layers = tokens.get("received_attention_by_layer")  # per layer (heads, N), computed when read
            depth = len(layers)
            check_encoder_layer(self.name, "object_layer", self.object_layer, depth, first=1)
            anchor_scores = layers[object_layer(self.object_layer, depth) - 1].float().mean(0)
            deep = tokens.get("received_attention").float().mean(0)
        else:  # no per-layer attention (no [CLS]: Qwen2-VL, LLaVA-OneVision): one received-attention score
            deep = tokens.token_attention.float().mean(0)
            anchor_scores = deep
        device = deep.device
        newline = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=device)
        for segment in tokens.segments:
            newline[segment.newline_indices().to(device)] = True
        patches = torch.nonzero(~newline).reshape(-1)
        anchors = patches[torch.argsort(anchor_scores[patches], descending=True, stable=True)]
        anchors = anchors[:min(round(k * self.alpha / 5), anchors.numel())]
        neighbours = neighbour_table(tokens, self.buffer, device)[:, anchors].reshape(-1)  # direction-major
        registers = patches[torch.argsort(deep[patches], descending=True, stable=True)]
        order = torch.cat([anchors, neighbours[neighbours >= 0], registers, torch.nonzero(newline).reshape(-1)])
        return Selection.of(first_distinct(order, k, tokens.num_tokens))


def neighbour_table(tokens: MediaItem, mode: str, device: torch.device) -> torch.Tensor:
    """``(4, N)``: each token's left, right, upper and lower neighbour on its segment's grid (-1: none; newline
    tokens have none). ``flat``: the raster index ``p -+ 1``, ``p -+ cols`` clamped to the grid (wrapping at row
    ends, the clamp giving the first or last patch); ``grid``: the 2-D neighbour when it lies inside the grid."""
    table = torch.full((4, tokens.num_tokens), -1, dtype=torch.long, device=device)
    for segment in tokens.segments:
        if segment.rows * segment.cols == 0:
            continue
        grid = segment.patch_indices().to(device)  # (rows, cols) token indices
        rows, cols = grid.shape
        flat = grid.reshape(-1)
        if mode == "flat":
            position = torch.arange(rows * cols, device=device)
            for d, step in enumerate((-1, 1, -cols, cols)):
                table[d, flat] = flat[(position + step).clamp(0, rows * cols - 1)]
        else:
            padded = torch.full((rows + 2, cols + 2), -1, dtype=torch.long, device=device)
            padded[1:-1, 1:-1] = grid
            for d, (dr, dc) in enumerate(((0, -1), (0, 1), (-1, 0), (1, 0))):
                table[d, flat] = padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols].reshape(-1)
    return table


def first_distinct(order: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The first ``k`` distinct values of ``order`` (token indices below ``n``), in order of first appearance."""
    position = torch.arange(order.numel(), device=order.device)
    first = torch.full((n,), order.numel(), dtype=torch.long, device=order.device)
    first = first.scatter_reduce(0, order, position, reduce="amin")
    seen = torch.nonzero(first < order.numel()).reshape(-1)
    return seen[torch.argsort(first[seen])][:k]
