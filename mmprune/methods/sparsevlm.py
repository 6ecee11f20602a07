"""SparseVLM: text raters score visual tokens at a few layers; pruned tokens are partly recycled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection
from mmprune.methods.base import InLLMPruner, scale_layers
from mmprune.methods.params import Bool, param

# v1.5's visual tokens kept after each pruning layer for its nominal budgets (LLaVA-1.5, 576 tokens)
TABLES = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
SCORE_LAYERS = (2, 6, 15)  # layer l's attention is read and its output pruned (32-layer LLM)


def nominal_counts(nominal: float, num_tokens: int) -> list[int]:
    """The v1.5 schedule for a nominal budget (of 576), interpolated linearly between the published ones (0 keeps
    nothing, 576 everything) and scaled to ``num_tokens``."""
    anchors = [(0.0, (0, 0, 0)), *((float(b), t) for b, t in sorted(TABLES.items())), (576.0, (576, 576, 576))]
    for (lo, lo_counts), (hi, hi_counts) in zip(anchors, anchors[1:]):
        if nominal <= hi:
            w = (nominal - lo) / (hi - lo)
            counts = [(1 - w) * a + w * b for a, b in zip(lo_counts, hi_counts)]
            break
    scaled = [min(num_tokens, int(round(c * num_tokens / 576))) for c in counts]
    return [min(c, prev) for c, prev in zip(scaled, [num_tokens, *scaled])]


def recycled(pruned: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for ``pruned`` tokens removed at a stage: ``int(0.3 n) + 1`` and one cluster per
    ten of them, plus one."""
    if pruned <= 0:
        return 0, 0
    count = int(0.3 * pruned) + 1
    return count, int(count / 10) + 1


def knn_density(d: torch.Tensor, k: int) -> torch.Tensor:
    """DPC-kNN local density ``rho_i = exp(-mean of the k smallest squared distances in row i)``. As the reference
    (``torch.topk(dist, k, largest=False)`` on the full matrix), the k smallest include the token's own zero
    distance, so ``k = 1`` gives every token density 1."""
    nearest = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).values
    return torch.exp(-(nearest**2).mean(dim=1))


def dpc_knn(x: torch.Tensor, clusters: int, seed: int = 0) -> torch.Tensor:
    """Cluster index of each row of ``x`` by density-peak clustering with k-NN density (as SparseVLM/TokenPacker):
    ``d = ||xi - xj|| / sqrt(C)``, ``rho`` = :func:`knn_density` with ``k = clusters`` plus seeded noise below 1e-6
    that breaks ties, ``delta`` = distance to the nearest denser token (the largest distance for the densest),
    centres = top ``clusters`` by ``rho * delta``, every token to its nearest centre."""
    n, channels = x.shape
    clusters = min(clusters, n)
    d = torch.cdist(x.float(), x.float()) / math.sqrt(channels)
    noise = torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(x.device) * 1e-6
    rho = knn_density(d, clusters) + noise
    denser = rho.unsqueeze(0) > rho.unsqueeze(1)  # [i, j]: j denser than i
    delta = torch.where(denser, d, torch.full_like(d, float("inf"))).min(dim=1).values
    delta = torch.where(torch.isinf(delta), d.max(), delta)
    centres = torch.topk(rho * delta, clusters).indices
    assign = d[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(clusters, device=x.device)
    return assign


@dataclass
class SparseVLMPruner(InLLMPruner):
    """Text-guided visual sparsification with token recycling (v1.5, the default of the reference's README).

    Paper: "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (ICML 2025);
    reference code Gumpest/SparseVLMs (branch v1.5).

    Rule (as the code):
      * raters, once, at the LLM input: ``m = mean_v softmax_t(V T^T)`` (raw dot products of the image's projected
        tokens ``V`` with every embedding after the image ``T``); raters are the text tokens with ``m_t > mean(m)``;
      * after layers 2, 6 and 15 (of 32) the layer's attention probabilities are read: ``r_v = mean over raters of
        the head-mean attention to v``; the top-k visual tokens stay (original order);
      * recycling: the ``int(0.3 n_pruned) + 1`` best-scored pruned tokens (their hidden states after the layer)
        are clustered by DPC-kNN into ``int(n / 10) + 1`` groups whose means are inserted right after the kept
        visual tokens;
      * when no text token is strictly above the mean (one text token after the image), all of them rate;
      * positions are renumbered (v1/v1.5 truncate ``position_ids``).

    Budget: ``keep`` is the nominal budget SparseVLM reports (64/96/128/192 of 576 -> the published schedules
    ``[66, 30, 17]``, ``[238, 48, 26]``, ``[303, 110, 36]``, ``[300, 200, 110]``; other values interpolate
    between them, scaled to the image's token count). The executed equivalent average (the pruning layer itself
    runs at full size; recycled tokens count) is in ``pruner.stats``: 202.75 + recycled for "192", as methods.md
    computes. Differences: attention rows of the raters only are recomputed (the model keeps SDPA); the DPC-kNN
    tie-breaking noise is seeded (the reference draws it from the global RNG); batches of any size (the reference
    assumes one sample). The DPC-kNN density counts the token's own zero distance among its k nearest, as the
    reference's ``cluster_and_merge`` does.

    Videos: a video item's tokens are scored as one span with the same rule (it reads no 2-D layout), and
    its ``keep`` counts the whole video's tokens.
    """

    keep: int | float = 192 / 576
    recycle: bool = param(True, Bool(), "recycle pruned tokens as DPC-kNN cluster means (v1.5)")

    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    name: ClassVar[str] = "sparsevlm"
    summary: ClassVar[str] = "in-LLM, 3 stages: text raters' attention + recycling of pruned tokens (SparseVLM v1.5)"
    keep_means: ClassVar[str] = "nominal budget of SparseVLM's published schedules"
    default_positions: ClassVar[str | None] = "renumber"

    def _nominal(self, num_tokens: int) -> float:
        fraction = self.keep if isinstance(self.keep, float) else self.budget(num_tokens) / num_tokens
        return fraction * 576

    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        score_layers = scale_layers([layer + 1 for layer in SCORE_LAYERS], num_layers)
        self._kept, counts = [], []
        for image in images:
            kept = nominal_counts(self._nominal(image.count), image.count)
            if isinstance(self.keep, float) and self.keep == 1.0:
                kept = [image.count] * len(kept)
            totals, current = [], image.count
            for k in kept:
                k = min(k, current)
                extra = recycled(current - k)[1] if self.recycle else 0
                current = min(current, k + extra)
                totals.append(current)
            self._kept.append(kept)
            counts.append(totals)
        self._schedule = {"keep": self.keep, "mode": "nominal budget -> v1.5 schedule", "layers": score_layers,
                          "kept": self._kept, "counts_with_recycled": counts}
        return score_layers, counts

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        return {0} | {layer - 1 for layer in stage_layers}

    def raters(self, ctx, track) -> torch.Tensor:
        """Indices (into the text after the image) of the rater tokens, from the LLM input."""
        raters = ctx.scratch.setdefault("raters", {})
        key = (track.sample, track.modality, track.index_in_sample)
        if key not in raters:
            embeds = ctx.layer_input(0)[track.sample]
            text = ctx.text_after(track)
            visual = embeds[track.positions].float()
            m = (visual @ embeds[text].float().T).softmax(dim=-1).mean(dim=0)
            above = m > m.mean()
            # all text tokens equal (e.g. a single one): none is above the mean, so every one rates
            raters[key] = (above if bool(above.any()) else torch.ones_like(above)).nonzero().squeeze(1)
        return raters[key]

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        out = []
        for image, track in enumerate(ctx.tracks):
            k = min(self._kept[image][stage], track.count)
            text = ctx.text_after(track)
            raters = text[self.raters(ctx, track)] if text.numel() else ctx.last_token()[track.sample:track.sample + 1]
            probs = ctx.sample_attention(ctx.layer - 1, track.sample, raters)  # (H, R, L)
            scores = self.image_scores(probs.mean(dim=0)[:, track.positions].mean(dim=0), track)
            order = torch.argsort(scores, descending=True, stable=True)
            kept = torch.sort(order[:k]).values
            count, clusters = recycled(track.count - k) if self.recycle else (0, 0)
            if clusters == 0:
                out.append(Selection.of(kept))
                continue
            pool = order[k:k + count]
            hidden = ctx.hidden[track.sample, track.positions]
            assign = dpc_knn(hidden[pool], clusters)
            one_hot = torch.nn.functional.one_hot(assign, clusters).float()
            # the reference's weighted mean with unit weights: sum / (count + 1e-6)
            merged = (one_hot.T @ hidden[pool].float()) / (one_hot.sum(0) + 1e-6).unsqueeze(1)
            centres = torch.stack([pool[assign == c][0] for c in range(clusters)])
            out.append(Selection(slots=torch.cat([kept, centres]), embeds=torch.cat([hidden[kept], merged.to(
                hidden.dtype)]), merged=clusters))
        return out
