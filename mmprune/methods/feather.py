"""FEATHER: prune by the last token's RoPE-free attention to the image, plus a uniform grid, in two stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection
from mmprune.methods.base import MultiStagePruner
from mmprune.methods.params import Float, Int, param


def stride_grid(segments, stride: int) -> torch.Tensor:
    """Original indices of a 2-D ``stride`` x ``stride`` grid over every patch grid of an image."""
    picked = [segment.patch_indices()[::stride, ::stride].reshape(-1) for segment in segments]
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


@dataclass
class FeatherPruner(MultiStagePruner):
    """Top-k by a RoPE-free criterion united with a uniform grid, then a second top-k.

    Paper: "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model Acceleration"
    (ICCV 2025); reference code markendo/FEATHER. The paper shows FastV-style scores, with RoPE, favour the
    bottom of the image (the tokens nearest the query) and so prune its top; FEATHER removes RoPE from the criterion
    and keeps a uniform grid to cover the whole image.

    Rule (as the code): the criterion of stage layer ``K`` is computed on the input of layer ``K-1`` with that
    layer's ``input_layernorm`` and ``q``/``k`` projections, **without RoPE**: the last token's query against the
    image's keys only, softmax over those keys, averaged over heads. Stage 1 (layer 8 of 32): the top
    ``int(N (1 - r))`` tokens united with a 2-D stride-3 grid (64 of 576 tokens). Stage 2 (layer 16): the top
    ``int(N (1 - r)^2)`` of the tokens left; the grid is not protected. ``r = 0.7``; original position ids.

    Budget: ``keep`` is the equivalent average (see :class:`MultiStagePruner`); the default is the paper's ``r``
    counted with the grid fully outside the top-k (an upper bound: overlap makes stage 1 keep fewer, so a
    sample may keep fewer tokens than another). ``ratio`` sets ``r`` explicitly. The criterion is recomputed from
    the recorded layer input, so the model keeps SDPA.
    """

    keep: int | float = (8 + 8 * (0.3 + 64 / 576) + 16 * 0.09) / 32
    ratio: float | None = param(None, Float(0, 1, high_open=True, optional=True),
                                "the dropped share r (default: solved from keep)")
    stride: int = param(3, Int(1), "stride of the uniform grid added at the first stage")

    name: ClassVar[str] = "feather"
    summary: ClassVar[str] = "in-LLM, 2 stages: RoPE-free last-token attention to the image + stride-3 grid (FEATHER)"
    default_positions: ClassVar[str | None] = "original"
    paper_layers: ClassVar[tuple[int, ...]] = (8, 16)
    strength_field: ClassVar[str] = "ratio"
    variable_counts: ClassVar[bool] = True

    def explicit_strength(self) -> float | None:
        return None if self.ratio is None else 1.0 - self.ratio

    def stage_counts(self, image, strength: float, stages: int) -> list[int]:
        n = image.count
        grid = int(stride_grid(image.segments, self.stride).numel())
        counts = [min(n, int(n * strength) + grid)] + [int(n * strength ** (s + 1)) for s in range(1, stages)]
        return [min(c, prev) for c, prev in zip(counts, [n, *counts])]

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        return {layer - 1 for layer in stage_layers}

    def criterion(self, ctx) -> list[torch.Tensor]:
        """Per image: head-mean softmax of the last token's RoPE-free query over the image's current keys."""
        q, k = ctx.queries_keys(ctx.layer - 1, ctx.last_token().unsqueeze(1), rope=False)
        scaling = ctx.scaling(ctx.layer - 1)
        out = []
        for track in ctx.tracks:
            keys = k[track.sample, :, track.positions]  # (H, n, d)
            logits = (q[track.sample, :, 0:1].float() @ keys.float().transpose(-1, -2)).squeeze(1) * scaling
            out.append(self.image_scores(logits.softmax(dim=-1).mean(dim=0), track))
        return out

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        selections = []
        for image, (track, scores, k) in enumerate(zip(ctx.tracks, self.criterion(ctx), counts)):
            n = track.count
            if stage == 0:
                top = int(self._strengths[image] * n)
                chosen = torch.topk(scores, min(top, n)).indices
                grid = stride_grid(track.segments, self.stride).to(track.original.device)
                on_grid = torch.isin(track.original, grid).nonzero().squeeze(1)
                chosen = torch.unique(torch.cat([chosen, on_grid.to(chosen.device)]))
            else:
                chosen = torch.topk(scores, k).indices
            selections.append(Selection.of(chosen))
        return selections
