"""PyramidDrop: drop visual tokens in stages, each time by the last instruction token's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.methods.base import MultiStagePruner
from mmprune.methods.params import Float, param


@dataclass
class PyramidDropPruner(MultiStagePruner):
    """Pyramid-shaped visual redundancy reduction.

    Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction"
    (CVPR 2025); reference code Cooperx521/PyramidDrop.

    Rule (as the code): before each stage layer ``K`` (``layer_list=[8, 16, 24]`` of 32), the hidden states
    entering ``K`` go through layer ``K``'s ``input_layernorm`` and ``q``/``k`` projections with RoPE at the
    current positions; the **last instruction token**'s causal softmax row (``1/sqrt(d_h)`` scaling), averaged over
    heads, scores the visual tokens; the top ``int(N * lambda**s)`` (``s`` = 1, 2, 3, relative to the original
    count ``N``) stay, in original order. Positions are renumbered (the code's default).

    Budget: ``keep`` is the equivalent average (see :class:`MultiStagePruner`); the default, 270/576, is the paper's
    ``lambda = 0.5`` schedule (``T_eq`` 270 on LLaVA-1.5). ``lam`` sets lambda explicitly. Layers for other depths
    are the paper's scaled to the same relative depth. Differences: the row is recomputed (the model keeps SDPA),
    GQA key heads are repeated (the code assumes ``kv_heads == heads``), batches are padded (the code loops per
    sample).

    Videos: a video item's tokens are scored as one span with the same rule (it reads no 2-D layout), and
    its ``keep`` counts the whole video's tokens.
    """

    keep: int | float = 270 / 576
    lam: float | None = param(None, Float(0, 1, low_open=True, optional=True),
                              "lambda, the share kept at each stage (default: solved from keep)")

    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    name: ClassVar[str] = "pyramiddrop"
    summary: ClassVar[str] = "in-LLM, 3 stages: last instruction token's attention, keep N*lambda^s (PyramidDrop)"
    default_positions: ClassVar[str | None] = "renumber"
    paper_layers: ClassVar[tuple[int, ...]] = (8, 16, 24)
    strength_field: ClassVar[str] = "lam"

    def stage_counts(self, image, strength: float, stages: int) -> list[int]:
        return [int(image.count * strength ** (s + 1)) for s in range(stages)]

    def scores(self, ctx, stage: int) -> torch.Tensor:
        return ctx.attention(ctx.layer, ctx.last_token().unsqueeze(1)).mean(dim=1)[:, 0]
