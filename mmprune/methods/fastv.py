"""FastV: after layer K-1, keep the visual tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.methods.base import SingleStagePruner
from mmprune.methods.params import Choice, param

QUERIES = ("last", "all")


@dataclass
class FastVPruner(SingleStagePruner):
    """Prune after layer ``K-1`` by the attention visual tokens receive there.

    Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
    Vision-Language Models" (ECCV 2024); reference code pkunlp-icler/FastV.

    Rule (as the code): at layer ``K-1``, the attention row of the **last prompt token**, averaged over heads,
    restricted to the visual columns; the top-``keep`` visual tokens (and every text token) enter layer ``K``, in
    original order, with their **original position ids** (the code's inplace mode). ``query="all"`` is the paper's
    wording instead: the mean attention each visual token receives from all (causally later) tokens.

    Defaults: the paper's ``K=2`` and ``R=50%`` (``keep=0.5``). Differences: the row is recomputed from layer
    ``K-1``'s input (its norm, q/k projections and RoPE), so the model keeps SDPA/FlashAttention instead of eager;
    batches of any size (the reference indexes sample 0 and a fixed image offset); the budget is per image.

    Videos and audio: an item's tokens are scored as one span with the same rule (it reads no 2-D layout); ``keep``
    counts a whole video's tokens and ``keep_audio`` an audio clip's (the FastV baseline of SEATS).
    """

    keep: int | float = 0.5
    query: str = param("last", Choice(options=QUERIES),
                       "'last': the last prompt token's attention (the code); 'all': attention received from all")

    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")
    name: ClassVar[str] = "fastv"
    summary: ClassVar[str] = "in-LLM: top-k by the last token's attention at layer K-1 (FastV)"
    default_positions: ClassVar[str | None] = "original"

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        return {self.layer - 1}

    def scores(self, ctx, stage: int) -> torch.Tensor:
        if self.query == "last":
            return ctx.attention(self.layer - 1, ctx.last_token().unsqueeze(1)).mean(dim=1)[:, 0]
        length = ctx.mask.shape[1]
        rows = torch.arange(length, device=ctx.mask.device).expand(ctx.mask.shape[0], -1)
        received = ctx.attention(self.layer - 1, rows).mean(dim=1)  # (B, q, L)
        received = received * ctx.mask[:, :, None]
        return received.sum(dim=1) / ctx.mask.sum(dim=1, keepdim=True)
