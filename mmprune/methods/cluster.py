"""Cluster-level token aggregation: k-means each image's tokens into the budget and pass on the cluster means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Int, param


def kmeans(points: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """``(n,)`` cluster of each point after Lloyd's iterations (squared Euclidean distance; ties to the lower
    cluster), started from ``k`` evenly spaced points, empty clusters re-seeded (:func:`reseed`); stops early once
    no assignment changes."""
    n = points.shape[0]
    centres = points[torch.linspace(0, n - 1, k).round().long()].clone()
    assign = torch.full((n,), -1, dtype=torch.long, device=points.device)
    for _ in range(iterations):
        new = torch.cdist(points, centres).argmin(dim=1)
        reseed(points, centres, new, k)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = points[assign == c]
            if members.shape[0]:
                centres[c] = members.mean(dim=0)
    return assign


def reseed(points: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, k: int) -> None:
    """Give each empty cluster the point farthest from its own centre among clusters of two or more points (the
    usual k-means repair), in place; a cluster stays empty only when no point is apart from its centre."""
    counts = torch.bincount(assign, minlength=k)
    for c in torch.nonzero(counts == 0).reshape(-1).tolist():
        distance = ((points - centres[assign]) ** 2).sum(dim=-1)
        distance[counts[assign] <= 1] = -1.0
        far = int(torch.argmax(distance))
        if distance[far] <= 0:
            return
        counts[assign[far]] -= 1
        assign[far], counts[c] = c, 1
        centres[c] = points[far]


@dataclass
class ClusterPruner(PreLLMPruner):
    """Cluster each image's tokens into ``keep`` groups and pass on each group's mean.

    Paper: "Token Sequence Compression for Efficient Multimodal Computing" (arXiv 2504.17892), which reports that
    simple cluster-level token aggregation beats attention-based selection. No reference code was found, so this is
    a reading of the paper, stated here: k-means with ``k = keep`` on the L2-normalised projected tokens (Lloyd's
    algorithm, squared Euclidean distance, started from ``k`` evenly spaced tokens so the result is deterministic,
    at most ``iterations`` rounds, an empty cluster re-seeded with the point farthest from its centre); each cluster
    becomes one token, the mean of its members' projected (unnormalised) embeddings, in the slot (and, under
    ``positions="original"``, the position) of its first member; the outputs keep the order of those first members.
    Only an image with fewer than ``keep`` distinct tokens can leave a cluster empty; it then keeps fewer tokens and
    its stats entry says so (``note``).
    """

    keep: int | float = 0.25
    iterations: int = param(20, Int(1), "most rounds of Lloyd's algorithm")

    name: ClassVar[str] = "cluster"
    summary: ClassVar[str] = "k-means of the projected tokens to the budget, cluster means (token sequence compression)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        embeds = tokens.embeds
        assign = kmeans(F.normalize(embeds.float(), dim=-1), k, self.iterations)
        clusters = [torch.nonzero(assign == c).reshape(-1) for c in range(k)]
        clusters = sorted((members for members in clusters if members.numel()), key=lambda m: int(m[0]))
        slots = torch.stack([members[0] for members in clusters])
        means = torch.stack([embeds[members].float().mean(dim=0) for members in clusters]).to(embeds.dtype)
        selection = Selection(slots=slots, embeds=means, merged=sum(int(m.numel() > 1) for m in clusters))
        if len(clusters) < k:
            selection.note = f"{k - len(clusters)} of the {k} clusters ended empty: {len(clusters)} tokens kept"
        return selection
