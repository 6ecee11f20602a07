"""HiRED: split the budget between the full image and the anyres sub-images by early-layer [CLS] attention, then
keep each partition's top tokens by late-layer [CLS] attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner, check_encoder_layer
from mmprune.methods.params import Float, Int, param

NEWLINE = -1  # partition id of LLaVA-NeXT's image-newline tokens


@dataclass
class HiREDPruner(PreLLMPruner):
    """HiRED (High-Resolution Early Dropping).

    Paper: HiRED (AAAI 2025, arXiv 2408.10945), "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models in Resource-Constrained Environments"; reference code hasanar1f/HiRED
    (``transformers/src/transformers/models/llava_next/modeling_llava_next.py``: ``HiRED_token_selection``,
    ``HiRED_sub_img_budgets``; the one-partition LLaVA-1.5 variant in ``models/llava/modeling_llava.py``).

    Rule (as the code), per image of ``P`` crops (the full image, crop 0, then ``P - 1`` sub-images in the
    processor's row-major order), with ``N_v`` patches per crop and each crop's [CLS] rows
    ``softmax(q_cls k^T / sqrt(d_h))`` recomputed from hooked q/k and **summed over heads**:
      1. Total ``T = int(P * N_v * token_budget_rate)``; full-image share ``F = min(int(T * alpha), N_v)``;
         sub-images ``S = min(T - F, (P - 1) * N_v)``.
      2. The full image keeps its top-``F`` patches by its layer-22 [CLS] row.
      3. Budget split: mark the full image's top ``int(N_v * (1 - alpha))`` patches by its layer-0 [CLS] row; cut the
         flattened (raster-order) mark map into ``P - 1`` contiguous 1-D chunks of ``N_v / (P - 1)`` patches (a
         ``reshape(h, w, -1)``, so chunk ``j`` is a band of base rows, not the 2-D quadrant of sub-image ``j``);
         sub-image ``j`` gets ``int(S * marks_j / sum(marks))``, clamped to ``N_v``.
      4. Sub-image ``j`` keeps its top tokens by its own layer-22 [CLS] row.
    Defaults: ``token_budget_rate=0.2`` (here ``keep=0.2``), ``alpha=0.5``. Layers 0 and 22 of CLIP-L's 24 (16
    heads, hard-coded). The LLaVA-1.5 variant keeps ``int(N_v * rate)`` patches by layer 22 alone. Kept tokens stay
    in original order; the code packs them without image-newline tokens (``image_newline=None``).

    Here:
      * ``keep`` is the whole image's budget ``T`` (a count, or a fraction of its LLM tokens, newlines included:
        mmprune's global convention, FasterVLM's 2880 -> 640/320/160), not a fraction of ``P * N_v`` padded patches.
      * Layers: ``early_layer`` (default 0, the first layer at any depth) and the late layer, by default the model's
        vision feature layer (the rows ``token_attention`` holds): layer 22 of 24 *is* LLaVA-NeXT's feature layer
        (``hidden_states[-2]``), so the default moves with the tower's depth and ``vision_feature_layer``;
        ``late_layer`` picks an encoder layer instead.
      * Sub-images: each packed token's crop comes from the adapter's ``crop_index`` field when it offers one
        (exact). Without it the high-res grid is cut into tiles: with base side ``s`` and a high-res grid of
        ``R x C`` patches (HF unpads symmetrically), ``ceil(R/s) x ceil(C/s)`` tiles, offset by the padding
        ``(ceil(R/s) * s - R) // 2`` rows (or columns). That is exact when the processor's canvas pads less than
        half a crop per side (an image at least a crop wide in the padded direction, tested against HF's packing)
        and merges sub-images otherwise (small images upscaled into a two-crop canvas). A sub-image's capacity is
        its tokens left after unpadding (the code clamps to ``N_v`` and loses the tokens it picks in the padding
        when it unpads the mask afterwards). Chunks are ``[floor(j n / (P-1)), floor((j+1) n / (P-1)))`` of the
        base's ``n`` patches (the code's equal chunks when ``P - 1`` divides ``n``); the proportional shares are
        computed exactly in integers (the code in float32).
      * Exactly ``keep`` tokens stay: the floors' remainder goes to the sub-images by largest remainder (ties to
        the earlier one); a share the clamp cuts is fixed at its capacity and the rest shared again among the other
        sub-images; what no sub-image holds goes to the full image. An image encoded as its base crop alone
        (``P = 1``), LLaVA-1.5 and towers without the per-layer rows put the whole budget in one partition, as the
        LLaVA-1.5 variant does (the NeXT code would keep only ``int(T * alpha)``). With no marked patch
        (``int(n (1 - alpha)) = 0``, where the code divides by zero) chunks weigh by their size.
      * Newline tokens carry no attention and are never kept, unless the budget exceeds the patches.
      * Towers without [CLS] (Qwen2-VL, LLaVA-OneVision): no per-layer [CLS] rows, so one partition scored by the
        family's substitute (``token_attention``: the attention each token receives at the feature layer, summed
        over heads), i.e. HiRED's LLaVA-1.5 rule on that score.
      * Ties go to the earlier token (``torch.topk`` leaves them unspecified); batches of any size.
    """

    keep: int | float = 0.2
    alpha: float = param(0.5, Float(0.0, 1.0), "share of the budget the full image takes (alpha)")
    early_layer: int = param(0, Int(0), "encoder layer whose [CLS] rows split the budget between sub-images")
    late_layer: int | None = param(None, Int(0, optional=True),
                                   "encoder layer whose [CLS] rows rank tokens (default: the vision feature layer)")

    encoder_fields: ClassVar[tuple[str, ...]] = ("cls_attention_by_layer",)
    name: ClassVar[str] = "hired"
    summary: ClassVar[str] = ("budget split over anyres sub-images by early [CLS] attention, top-k per partition "
                              "by late [CLS] attention (HiRED)")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        if tokens.has("cls_attention_by_layer"):
            rows = tokens.get("cls_attention_by_layer")  # per layer (heads, N), computed when read
            depth = len(rows)
            for field, layer in (("early_layer", self.early_layer), ("late_layer", self.late_layer)):
                check_encoder_layer(self.name, field, layer, depth)
            late = (tokens.token_attention if self.late_layer is None else rows[self.late_layer]).float().sum(0)
            early = rows[self.early_layer].float().sum(0)
            part, subimages = partitions(tokens)
        else:  # no [CLS] (Qwen2-VL, LLaVA-OneVision): the family's received-attention substitute, one partition
            late, early, subimages = tokens.token_attention.float().sum(0), None, 0
            part = torch.zeros(tokens.num_tokens, dtype=torch.long)
            for segment in tokens.segments:
                part[segment.newline_indices()] = NEWLINE
        part = part.to(late.device)
        counts = allocate(k, part, subimages, early, self.alpha)
        kept = torch.cat([top(late, part == p, count) for p, count in enumerate(counts)])
        if kept.numel() < k:  # the budget exceeds the patches: newline tokens, in order
            kept = torch.cat([kept, torch.nonzero(part == NEWLINE).reshape(-1)[:k - kept.numel()]])
        return Selection.of(kept)


def top(scores: torch.Tensor, member: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest ``scores`` among ``member`` tokens (ties to the earlier token)."""
    indices = torch.nonzero(member).reshape(-1)
    order = torch.argsort(scores[indices], descending=True, stable=True)
    return indices[order[:count]]


def partitions(tokens: MediaItem) -> tuple[torch.Tensor, int]:
    """``(N,)`` partition of every token (0: the full image, ``1 + j``: anyres sub-image ``j`` in the processor's
    row-major order, -1: newline) and the number of sub-images.

    The adapter's ``crop_index`` when offered. Otherwise one partition unless the image has a LLaVA-NeXT high-res
    grid (a newline segment with patches) after its square base grid: that grid is the sub-images tiled row-major
    and unpadded symmetrically by HF, so with the base side ``s`` a token at grid row ``r`` lies in tile row
    ``(r + pad) // s`` with ``pad = (ceil(R/s) * s - R) // 2`` (columns alike), exact while ``pad < s / 2``."""
    if tokens.has("crop_index"):
        part = tokens.get("crop_index").long().cpu()
        return part, int(part.max())
    part = torch.zeros(tokens.num_tokens, dtype=torch.long)
    for segment in tokens.segments:
        part[segment.newline_indices()] = NEWLINE
    grids = [s for s in tokens.segments if s.newline and s.cols > 0]
    if not grids:
        return part, 0
    base = tokens.segments[0]
    if len(grids) != 1 or len(tokens.segments) != 2 or base.newline or base.rows != base.cols:
        raise ValueError("hired: expected a LLaVA-NeXT layout (a square base grid, then one high-res grid with "
                         f"newlines); got segments {tokens.segments}")
    grid, side = grids[0], base.rows
    tiles_h, tiles_w = math.ceil(grid.rows / side), math.ceil(grid.cols / side)
    pad_r, pad_c = (tiles_h * side - grid.rows) // 2, (tiles_w * side - grid.cols) // 2
    r = (torch.arange(grid.rows) + pad_r) // side
    c = (torch.arange(grid.cols) + pad_c) // side
    part[grid.patch_indices().reshape(-1)] = (1 + r.unsqueeze(1) * tiles_w + c.unsqueeze(0)).reshape(-1)
    return part, tiles_h * tiles_w


def allocate(k: int, part: torch.Tensor, subimages: int, early: torch.Tensor | None, alpha: float) -> list[int]:
    """Tokens each partition keeps: ``[full image, sub-image 0, ...]``, summing to ``min(k, patches)``."""
    sizes = [int((part == p).sum()) for p in range(subimages + 1)]
    if subimages == 0:
        return [min(k, sizes[0])]
    base = sizes[0]
    full = min(int(k * alpha), base)
    rest = min(k - full, sum(sizes[1:]))
    # layer-0 marks of the full image, cut into contiguous raster-order chunks, one per sub-image
    base_scores = early[part == 0]
    marked = torch.zeros(base, dtype=torch.bool, device=base_scores.device)
    marked[torch.argsort(base_scores, descending=True, stable=True)[:int(base * (1 - alpha))]] = True
    bounds = [j * base // subimages for j in range(subimages + 1)]
    weights = [int(marked[bounds[j]:bounds[j + 1]].sum()) for j in range(subimages)]
    if sum(weights) == 0:
        weights = [bounds[j + 1] - bounds[j] for j in range(subimages)]
    shares = proportional(rest, weights, sizes[1:])
    full += min(k - full - sum(shares), base - full)  # sub-images full: the full image takes what is left
    return [full, *shares]


def proportional(total: int, weights: list[int], capacity: list[int]) -> list[int]:
    """``total`` (at most ``sum(capacity)``) shared in proportion to ``weights``: the code's
    ``floor(total * w_j / sum(w))`` clamped to ``capacity_j``, completed to ``total`` exactly. A share whose quota
    reaches its capacity is fixed there and the rest is shared again among the others; the floors' remainder goes
    one each by largest remainder (Hamilton; ties to the earlier index). Zero weights get tokens only when every
    weighted share is full (then by room)."""
    fixed: dict[int, int] = {}
    while True:
        room = [j for j in range(len(weights)) if j not in fixed]
        left = total - sum(fixed.values())
        w = {j: weights[j] for j in room}
        if sum(w.values()) == 0:
            w = {j: capacity[j] for j in room}
        whole = sum(w.values())
        full = [j for j in room if left * w[j] >= capacity[j] * whole]
        if full:
            fixed.update({j: capacity[j] for j in full})
            continue
        shares = {j: left * w[j] // whole for j in room}
        order = sorted(room, key=lambda j: (-(left * w[j] % whole), j))
        for j in order[:left - sum(shares.values())]:
            shares[j] += 1
        return [fixed[j] if j in fixed else shares[j] for j in range(len(weights))]
