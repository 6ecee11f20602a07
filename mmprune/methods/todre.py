"""ToDRE: a diverse subset after the encoder, then every visual token leaves the LLM once it is no longer read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import HybridPruner, scale_layers
from mmprune.methods.divprune import max_min_diverse
from mmprune.methods.params import Bool, Float, Int, param


@dataclass
class ToDREPruner(HybridPruner):
    """Token diversity after the encoder, task relevance inside the LLM.

    Paper: "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language
    Models" (arXiv 2505.18757). No reference code was found; what the abstract fixes is followed, the rest is
    stated here.

    Pre-LLM: a greedy **k-center** subset of the projected visual tokens (cosine distance; the first centre is the
    token farthest from the image's mean token, then repeatedly the token farthest from all centres), ``keep``
    tokens per image (default 10%: "reduces 90% of visual tokens after vision encoder"), original order.

    In-LLM: "prunes all visual tokens within certain decoder layers" once information has migrated to the text.
    ``drop_layer`` (default: layer 16 of 32, scaled to the model's depth; the paper's layer is not published) is
    the first layer with no visual token. With ``adaptive=True`` each image is instead dropped at the first layer
    from ``drop_layer`` on where the last prompt token's attention (head-mean, recomputed from the layer's input)
    puts less than ``migration_threshold`` of its mass on that image; before that its tokens stay. ``keep=1.0``
    removes nothing at any stage.
    """

    keep: int | float = 0.1
    drop_layer: int | None = param(None, Int(1, optional=True),
                                   "first layer without visual tokens (default: 16 of 32, scaled to the depth)")
    adaptive: bool = param(False, Bool(), "drop each image once the last token's attention to it falls below "
                           "migration_threshold")
    migration_threshold: float = param(0.05, Float(0, 1, low_open=True, high_open=True),
                                       "with adaptive: attention mass below which an image's tokens leave")

    name: ClassVar[str] = "todre"
    summary: ClassVar[str] = "k-center diverse subset pre-LLM, then all visual tokens dropped mid-LLM (ToDRE)"
    keep_means: ClassVar[str] = "visual tokens entering the LLM (all leave at the drop layer)"
    default_positions: ClassVar[str | None] = "original"
    variable_counts: ClassVar[bool] = True

    def check_model(self, num_layers: int) -> None:
        if self.drop_layer is not None and self.drop_layer >= num_layers:
            raise ValueError(f"todre: drop_layer={self.drop_layer} is beyond the model: its language model has "
                             f"{num_layers} layers, so expected 1..{num_layers - 1}")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        features = F.normalize(tokens.embeds.float(), dim=-1)
        first = int(torch.argmax(1.0 - features @ F.normalize(features.mean(0), dim=0)))
        return Selection.of(max_min_diverse(tokens.embeds, k, first=first))

    def first_drop_layer(self, num_layers: int) -> int:
        if self.drop_layer is None:
            return scale_layers([16], num_layers)[0]
        self.check_model(num_layers)
        return self.drop_layer

    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        if isinstance(self.keep, float) and self.keep == 1.0:
            return [], [[] for _ in images]  # keep=1.0: nothing leaves, not even at the drop layer
        start = self.first_drop_layer(num_layers)
        layers = list(range(start, num_layers)) if self.adaptive else [start]
        # adaptive stages may keep an image whole (the most a stage keeps) or drop it entirely
        counts = [[image.count if self.adaptive else 0 for _ in layers] for image in images]
        return layers, counts

    def describe_schedule(self) -> dict:
        return {"keep": self.keep, "mode": "pre-LLM k-center, then drop all visual tokens",
                "drop_layer": self.drop_layer, "adaptive": self.adaptive}

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        device = ctx.hidden.device
        if not self.adaptive:
            return [Selection(slots=torch.empty(0, dtype=torch.long, device=device)) for _ in ctx.tracks]
        row = ctx.attention(ctx.layer, ctx.last_token().unsqueeze(1)).mean(dim=1)[:, 0]  # (B, L)
        out = []
        for track in ctx.tracks:
            mass = float(row[track.sample, track.positions].sum()) if track.count else 0.0
            out.append(Selection(slots=torch.empty(0, dtype=torch.long, device=device))
                       if mass < self.migration_threshold else Selection.identity(track.count, device=device))
        return out
