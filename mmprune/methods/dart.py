"""DART: keep the visual tokens least duplicated with a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import Selection
from mmprune.methods.base import SingleStagePruner
from mmprune.methods.params import Int, param


@dataclass
class DARTPruner(SingleStagePruner):
    """Duplication-aware token reduction.

    Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (EMNLP 2025);
    reference code ZichenWen1/DART (rule read from its llmc port, ``token_reduction/dart.py``).

    Rule (as the code), once, before layer ``K = 2``:
      1. pivots: the ``visual_pivots`` (4) visual tokens and the ``text_pivots`` (4) instruction tokens (after the
         image) with the largest L1 norm of their post-RoPE keys at layer ``K-1``, flattened over key heads;
      2. similarity space: the hidden states entering layer ``K`` through the model's final norm (``model.norm``);
      3. for each pivot in turn, the remaining visual candidates (visual pivots excluded) with the **lowest** cosine
         similarity to it join the kept set and leave the candidates;
      4. kept = visual pivots + the tokens chosen in 3 (text pivots are not visual and stay anyway), in original
         order, with original position ids.

    Defaults: ``K = 2``, reduction 0.778 (``keep = 128/576``), 4 + 4 pivots. Differences: the code takes
    ``floor(B / 8)`` tokens per pivot (132 kept for a budget of 128); here exactly ``keep`` tokens stay: the budget
    left after the visual pivots is split evenly over the pivots, the first pivots taking one more when it does not
    divide. The code iterates a Python set of pivots (unspecified order); here visual pivots come first, then text
    pivots, each by decreasing key norm. Batches of any size (the code assumes one sample).

    Videos: a video item's tokens are scored as one span with the same rule (it reads no 2-D layout), and
    its ``keep`` counts the whole video's tokens.
    """

    keep: int | float = 128 / 576
    visual_pivots: int = param(4, Int(0), "pivots among the visual tokens (largest post-RoPE key norm)")
    text_pivots: int = param(4, Int(0), "pivots among the instruction tokens")

    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    name: ClassVar[str] = "dart"
    summary: ClassVar[str] = "in-LLM: least-duplicated tokens w.r.t. key-norm pivots at layer K (DART)"
    default_positions: ClassVar[str | None] = "original"
    attention_scored: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.visual_pivots + self.text_pivots == 0:
            raise ValueError("dart needs at least one pivot: visual_pivots + text_pivots >= 1")

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        return {self.layer - 1}

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        _, keys = ctx.queries_keys(self.layer - 1, ctx.last_token().unsqueeze(1), repeat=False)
        norms = keys.float().abs().sum(dim=(1, 3))  # (B, L): L1 norm of the key, flattened over key heads
        features = F.normalize(ctx.final_norm(ctx.hidden).float(), dim=-1)
        selections = []
        for track, k in zip(ctx.tracks, counts):
            selections.append(Selection.of(self.select(track, ctx.text_after(track), norms[track.sample],
                                                       features[track.sample], k)))
        return selections

    def select(self, track, text: torch.Tensor, norms: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (into the image's current tokens) of the ``k`` kept tokens."""
        visual_norms = norms[track.positions]
        n_visual = min(self.visual_pivots, k, track.count)
        visual_pivots = torch.topk(visual_norms, n_visual).indices
        text_pivots = text[torch.topk(norms[text], min(self.text_pivots, text.numel())).indices]
        pivots = [features[track.positions[i]] for i in visual_pivots] + [features[t] for t in text_pivots]
        candidates = torch.ones(track.count, dtype=torch.bool, device=features.device)
        candidates[visual_pivots] = False
        chosen = [visual_pivots]
        left = k - n_visual
        visual = features[track.positions]
        for p, pivot in enumerate(pivots):
            share = left // len(pivots) + int(p < left % len(pivots))
            available = candidates.nonzero().squeeze(1)
            if share == 0 or available.numel() == 0:
                continue
            similarity = visual[available] @ pivot
            picked = available[torch.topk(-similarity, min(share, available.numel())).indices]
            candidates[picked] = False
            chosen.append(picked)
        return torch.cat(chosen)
