"""Uniform 2-D grid sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.grid import frame_shares, per_segment_budget, uniform_grid


@dataclass
class UniformPruner(PreLLMPruner):
    """Keep ``k`` tokens spread evenly over the image's 2-D patch grid.

    The stride rule ``grid[::r, ::r]`` used inside FEATHER (stride 3 -> 64 of 576) and PruMerge+, generalised to any
    ``k`` with an even ``linspace`` lattice (see :func:`mmprune.methods.grid.uniform_grid`); a 1-D ``linspace`` over
    the flattened sequence would be row-biased. On LLaVA-NeXT the budget is split over the base grid and the high-res
    grid in proportion to their patch counts, and image-newline tokens are not kept (they carry no image content).

    Videos: an even ``(t, h, w)`` lattice: ``k`` is shared evenly over the temporal grids (the remainder, or with
    fewer tokens than grids the grids that get one, spread evenly in time), each grid's share laid evenly in 2-D.
    Audio: ``keep_audio`` tokens evenly spaced in time (the clip is one ``1 x N`` grid).
    """

    keep: int | float = 0.25

    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")

    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "evenly spaced 2-D grid of patches (spatial baseline)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        if tokens.modality == "video":  # an even (t, h, w) lattice: evenly in time, each grid's share evenly in 2-D
            parts = zip(tokens.frames, frame_shares(len(tokens.frames), k))
        else:
            parts = per_segment_budget(tokens, k)
        picked = [uniform_grid(segment, share) for segment, share in parts if share > 0]
        return Selection.of(torch.cat(picked).to(tokens.embeds.device))
