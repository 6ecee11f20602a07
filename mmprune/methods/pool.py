"""2-D average pooling of the projected tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import Segment, Selection, MediaItem
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.grid import lattice_shape, split_budget


@dataclass
class PoolPruner(PreLLMPruner):
    """Average-pool each image's token grid down to the budget (the LLaVolta observation as a baseline).

    Paper: "LLaVolta: Efficient Multi-modal Models via Stage-wise Visual Context Compression" (NeurIPS 2024), which
    reports that average pooling at test time costs little GQA accuracy. As the catalog prescribes for a baseline, we
    pool after the projector. The grid is pooled with ``adaptive_avg_pool2d`` to the ``r x c`` shape with the most
    tokens ``<= k`` (ties: aspect closest to the grid's), so 24x24 -> 12x12 at 144 and 8x8 at 64 exactly as stride-2/3
    pooling; a budget with no such factorisation keeps slightly fewer tokens, reported in the stats. Each pooled token
    takes the slot (and, under ``positions="original"``, the position) of the centre patch of its window. LLaVA-NeXT:
    each grid is pooled with its share of the budget; image-newline tokens are not kept.

    Videos: each temporal grid is pooled in 2-D with an even share of ``k`` ((1, 2, 2)-style); when ``k`` is
    smaller than the number of grids, ``ceil(T / k)`` consecutive grids are averaged first ((2, 2, 2)-style), so
    the budget is met without dropping whole grids. Audio: 1-D average pooling of the clip (one ``1 x N`` grid)
    to ``keep_audio`` tokens.
    """

    keep: int | float = 0.25

    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")

    name: ClassVar[str] = "pool"
    summary: ClassVar[str] = "2-D average pooling of the projected tokens to the budget (LLaVolta baseline)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        slots, embeds = [], []
        for group, share in pooling_groups(tokens.segments, tokens.modality, k):
            s, e = pool_segment(tokens.embeds, group, share)
            slots.append(s)
            embeds.append(e)
        slots_t = torch.cat(slots).to(tokens.embeds.device)
        return Selection(slots=slots_t, embeds=torch.cat(embeds), merged=int(slots_t.numel()))

    def output_count(self, num_tokens: int, segments: list[Segment], modality: str = "image") -> int:
        """Each group's lattice (:func:`~mmprune.methods.grid.lattice_shape`) may hold fewer tokens than its share:
        keep 17 on a 12x12 grid pools to 4x4 = 16."""
        k = self.pre_llm_budget(num_tokens, modality)
        if k == num_tokens:
            return num_tokens
        return sum(math.prod(lattice_shape(group[0].rows, group[0].cols, share))
                   for group, share in pooling_groups(segments, modality, k))


def pooling_groups(segments: list[Segment], modality: str, k: int) -> list[tuple[list[Segment], int]]:
    """The grids pooled together and each group's share of ``k``: a video's temporal grids as
    :func:`video_groups` says; otherwise each grid alone with its proportional share (grids with none left out)."""
    if modality == "video":
        return _video_groups([s for s in segments if s.frame is not None], k)
    return [([segment], share) for segment, share in zip(segments, split_budget(k, [s.rows * s.cols
                                                                                      for s in segments]))
            if share > 0]


def video_groups(tokens: MediaItem, k: int) -> list[tuple[list[Segment], int]]:
    """A video's temporal grids in groups pooled together, each with its share of ``k``: groups of one grid
    ((1, 2, 2)-style spatial pooling) while ``k`` leaves every grid a token, else ``ceil(T / k)`` consecutive grids
    per group ((2, 2, 2)-style: averaged over time too)."""
    return _video_groups(tokens.frames, k)


def _video_groups(frames: list[Segment], k: int) -> list[tuple[list[Segment], int]]:
    span = max(1, math.ceil(len(frames) / k))
    groups = [frames[i:i + span] for i in range(0, len(frames), span)]
    share = k // len(groups)
    return [(group, share) for group in groups]


def pool_segment(embeds: torch.Tensor, segments: list[Segment], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool one grid (or several grids of one video, stacked in time) to the largest lattice within
    ``k``; a pooled token takes the slot of the centre patch of its window in the first grid."""
    grid = segments[0].patch_indices()
    rows, cols = grid.shape
    out_r, out_c = lattice_shape(rows, cols, k)
    stacked = torch.stack([embeds[s.patch_indices().reshape(-1).to(embeds.device)] for s in segments]).mean(0)
    feats = stacked.reshape(rows, cols, -1).permute(2, 0, 1)
    pooled = F.adaptive_avg_pool2d(feats.float().unsqueeze(0), (out_r, out_c))[0].to(embeds.dtype)
    # adaptive pooling windows: [floor(i*n/m), ceil((i+1)*n/m)); their centre patch donates the slot
    def centres(n: int, m: int) -> torch.Tensor:
        i = torch.arange(m)
        start = (i * n) // m
        end = -((-(i + 1) * n) // m)
        return (start + end - 1) // 2

    slots = grid[centres(rows, out_r)][:, centres(cols, out_c)].reshape(-1)
    return slots, pooled.permute(1, 2, 0).reshape(out_r * out_c, -1)
