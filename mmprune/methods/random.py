"""Random selection: the control every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Int, param


@dataclass
class RandomPruner(PreLLMPruner):
    """Keep a uniformly random size-``k`` subset of each image's tokens, in original order.

    The baseline of FastV's K=0 ablation and of UniPruneBench, where random selection proves a strong control.
    The subset is drawn from a generator seeded with ``seed`` and the image's index within its sample, so a sample
    keeps the same tokens whether it runs alone or in a padded batch. Videos and audio clips are one span each;
    ``keep_audio`` is the audio budget (SEATS' random baseline draws audio and video separately).

    Args:
        seed: base seed of the draw.
    """

    keep: int | float = 0.25
    seed: int = param(0, Int(0), "base seed of the draw")

    modalities: ClassVar[tuple[str, ...]] = ("image", "video", "audio")
    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "uniformly random subset of each image's tokens (seeded control)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        index = tokens.index_in_sample + SEED_OFFSETS[tokens.modality]
        generator = torch.Generator(device="cpu").manual_seed(image_seed(self.seed, index))
        indices = torch.randperm(tokens.num_tokens, generator=generator)[:k]
        return Selection.of(indices.to(tokens.embeds.device))


# each modality draws from its own seeds: a sample's first video does not repeat its first image's draw
SEED_OFFSETS = {"image": 0, "video": 500_000, "audio": 750_000}


def image_seed(seed: int, index_in_sample: int) -> int:
    """Seed of one item's draw; distinct items of a sample get distinct draws."""
    return seed * 1_000_003 + index_in_sample
