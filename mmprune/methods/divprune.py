"""DivPrune: keep a maximally diverse subset (greedy max-min distance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner


@dataclass
class DivPrunePruner(PreLLMPruner):
    """Greedy max-min diversity on the LLM input embeddings.

    Paper: "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models" (CVPR 2025); reference code
    vbdi/divprune (CC BY-NC 4.0: this is a clean-room implementation of the published rule).

    Rule: with ``D = 1 - cos`` between projected embeddings, first pick the token whose nearest other token is
    farthest (``argmax_i min_{j != i} D_ij``), then repeatedly the token farthest from the selected set
    (``argmax_i min_{s in S} D_si``); ties go to the lowest index; kept indices are sorted. Default ratio 0.098.

    Families: LLaVA-NeXT is global over the whole image span, newline tokens included, as the reference. Qwen2-VL
    (not in the reference) uses the post-merger embeddings, i.e. the LLM input, as VisionSelector's port does.

    Deliberate difference: the reference marks chosen tokens with score 0, so an exact duplicate of a chosen token
    (distance 0) could be chosen twice; chosen tokens are excluded here, so ``k`` distinct tokens are always kept.

    Videos: a video item's tokens are scored as one span with the same rule (it reads no 2-D layout), and
    its ``keep`` counts the whole video's tokens.
    """

    keep: int | float = 0.098

    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    name: ClassVar[str] = "divprune"
    summary: ClassVar[str] = "greedy max-min cosine diversity on the projected tokens (DivPrune)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        return Selection.of(max_min_diverse(tokens.embeds, k))


def max_min_diverse(features: torch.Tensor, k: int, first: int | None = None) -> torch.Tensor:
    """Greedy max-min selection under cosine distance, in pick order; ``first`` defaults to DivPrune's choice,
    the token whose nearest other token is farthest."""
    x = F.normalize(features.float(), dim=-1)
    distance = 1.0 - x @ x.T
    n = distance.shape[0]
    if first is None:
        eye = torch.eye(n, dtype=torch.bool, device=distance.device)
        first = int(torch.argmax(distance.masked_fill(eye, float("inf")).min(dim=1).values))
    chosen = torch.zeros(n, dtype=torch.bool, device=distance.device)
    order = [first]
    chosen[first] = True
    nearest = distance[first].clone()
    for _ in range(k - 1):
        nxt = int(torch.argmax(nearest.masked_fill(chosen, float("-inf"))))
        order.append(nxt)
        chosen[nxt] = True
        nearest = torch.minimum(nearest, distance[nxt])
    return torch.tensor(order, device=features.device)
