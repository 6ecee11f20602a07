"""The unpruned model as a method, so every table and sweep has its reference row under one contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner


@dataclass
class NonePruner(PreLLMPruner):
    """No pruning: every visual token reaches every layer (``keep`` must stay 1.0). Attaching it changes nothing
    in the model's outputs; it records the same stats as any method (token counts, per-layer counts), which makes
    it the reference row of ``mmprune bench``."""

    keep: int | float = 1.0

    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")
    passes_through: ClassVar[tuple[str, ...]] = modalities  # accepts every medium, reduces none
    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "no pruning: the unpruned model (reference row)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.keep, float) and self.keep == 1.0):
            raise ValueError(f"none keeps every visual token: keep must be 1.0, got {self.keep!r}")

    def select(self, tokens: MediaItem, k: int) -> Selection:  # pragma: no cover - keep=1.0 never selects
        return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
