"""Random selection: the control every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.engine.tokens import Selection, VisualTokens
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Int, param


@dataclass
class RandomPruner(PreLLMPruner):
    """Keep a uniformly random size-``k`` subset of each image's tokens, in original order.

    The baseline of FastV's K=0 ablation and of UniPruneBench, where random selection proves a strong control.
    The subset is drawn from a generator seeded with ``seed`` and the image's index within its sample, so a sample
    keeps the same tokens whether it runs alone or in a padded batch.

    Args:
        seed: base seed of the draw.
    """

    keep: int | float = 0.25
    seed: int = param(0, Int(0), "base seed of the draw")

    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "uniformly random subset of each image's tokens (seeded control)"

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        generator = torch.Generator(device="cpu").manual_seed(image_seed(self.seed, tokens.image_in_sample))
        indices = torch.randperm(tokens.num_tokens, generator=generator)[:k]
        return Selection.of(indices.to(tokens.embeds.device))


def image_seed(seed: int, image_in_sample: int) -> int:
    """Seed of one image's draw; distinct images of a sample get distinct draws."""
    return seed * 1_000_003 + image_in_sample
