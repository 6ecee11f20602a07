"""VisionDrop: VisionZip before the LLM, then visual-to-visual attention and merging inside it, in stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import HybridPruner, scale_layers
from mmprune.methods.visionzip import VisionZipPruner, merge_contextual

# The reference schedule for a 32-token average on LLaVA-1.5 (576 tokens, 32 layers): 42 dominant + 6 contextual
# tokens leave the encoder; after layers 8, 16 and 24, (dominant, contextual) = (30, 5), (22, 4), (16, 3).
ENCODER = (42, 6)
STAGES = ((30, 5), (22, 4), (16, 3))
PAPER_LAYERS = (8, 16, 24)
PAPER_AVERAGE = 32


@dataclass
class VisionDropPruner(HybridPruner):
    """Training-free, visual-only token reduction across the encoder and the LLM.

    Paper: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (AAAI 2026); reference code
    Ruixxxx/VisionDrop.

    Rule (as the code):
      * encoder: VisionZip (this library's ``visionzip``) with 42 dominant and 6 contextual tokens;
      * LLM, before layers 8, 16, 24 (PyramidDrop's mechanics: the next layer's norm and q/k projections with RoPE
        on the hidden states entering it): **visual-to-visual** attention, the image's tokens as queries, causal
        softmax over the whole row, averaged over heads, then over the image's queries, per image key; the top
        ``dominant`` tokens stay; the rest are merged VisionZip-style into ``contextual`` tokens (that layer's
        keys averaged over heads as the similarity, targets at a stride, each token to its most similar target,
        ``target + mean(members)`` on the hidden states); the image continues as ``[dominant, contextual]``.
      * positions renumbered (the code's default).

    Budget: ``keep`` is the equivalent average budget (default 32/576, the paper's headline setting); every count
    of the reference schedule is scaled by ``keep / (32/576)`` (and by ``N / 576``), which meets ``keep`` exactly
    on the reference geometry (stages at 1/4, 1/2, 3/4 of the depth); other depths put the stages at the nearest
    layers and the stats report the resulting average. Keys for merging are post-RoPE, as the layer's attention
    uses them. The text never enters the criterion, so the choice depends only on the image.
    """

    keep: int | float = PAPER_AVERAGE / 576

    name: ClassVar[str] = "visiondrop"
    summary: ClassVar[str] = "VisionZip pre-LLM, then visual-visual attention + merging at 3 LLM stages (VisionDrop)"
    keep_means: ClassVar[str] = "equivalent average visual tokens per layer"
    default_positions: ClassVar[str | None] = "renumber"

    def _counts(self, num_tokens: int) -> list[tuple[int, int]]:
        """(dominant, contextual) of the encoder stage and each LLM stage for an image of ``num_tokens`` tokens:
        the reference counts scaled by ``keep / (32/576)`` and by ``num_tokens / 576`` (exact for the reference's
        32-layer geometry; the stats report the average the model's own depth gives)."""
        fraction = self.keep if isinstance(self.keep, float) else self.budget(num_tokens) / num_tokens
        factor = fraction / (PAPER_AVERAGE / 576) * num_tokens / 576
        out, previous = [], num_tokens
        for dominant, contextual in (ENCODER, *STAGES):
            total = min(previous, max(2, round((dominant + contextual) * factor)))
            merged = min(total - 1, round(total * contextual / (dominant + contextual)))
            out.append((total - merged, merged))
            previous = total
        return out

    def _keeps_all(self) -> bool:
        return isinstance(self.keep, float) and self.keep == 1.0

    def pre_llm_budget(self, num_tokens: int, modality: str = "image") -> int:
        return num_tokens if self._keeps_all() else sum(self._counts(num_tokens)[0])

    def select(self, tokens: MediaItem, k: int) -> Selection:
        contextual = self._counts(tokens.num_tokens)[0][1]
        return VisionZipPruner(keep=k, contextual=contextual).select(tokens, k)

    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        layers = scale_layers(PAPER_LAYERS, num_layers)
        if self._keeps_all():
            return layers, [[image.count] * len(layers) for image in images]
        self._splits = [self._counts(sum(s.size for s in image.segments))[1:] for image in images]
        counts = [[min(image.count, d + c) for d, c in splits] for image, splits in zip(images, self._splits)]
        self._schedule = {"keep": self.keep, "mode": "reference schedule scaled to keep", "layers": layers,
                          "counts": counts}
        return layers, counts

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        out = []
        for image, (track, k) in enumerate(zip(ctx.tracks, counts)):
            if k >= track.count:
                out.append(Selection.identity(track.count, device=ctx.hidden.device))
                continue
            queries = track.positions.unsqueeze(0)
            probs = ctx.attention(ctx.layer, queries.expand(ctx.mask.shape[0], -1))[track.sample]  # (H, n, L)
            scores = probs.mean(dim=0)[:, track.positions].mean(dim=0)  # received from the image's queries
            contextual_count = min(self._splits[image][stage][1], k - 1)
            dominant_count = k - contextual_count
            dominant = torch.sort(torch.topk(scores, dominant_count).indices).values
            rest = torch.ones(track.count, dtype=torch.bool, device=scores.device)
            rest[dominant] = False
            rest = rest.nonzero().squeeze(1)
            _, keys = ctx.queries_keys(ctx.layer, queries.expand(ctx.mask.shape[0], -1)[:, :1], repeat=False)
            metric = keys[track.sample].float().mean(dim=0)[track.positions[rest]]
            hidden = ctx.hidden[track.sample, track.positions]
            targets, merged = merge_contextual(metric, hidden[rest], contextual_count)
            embeds = torch.cat([hidden[dominant], merged]).to(ctx.hidden.dtype)
            out.append(Selection(slots=torch.cat([dominant, rest[targets]]), embeds=embeds, merged=contextual_count))
        return out
