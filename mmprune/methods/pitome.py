"""PiToMe: energy-protected token merging, repeated on the projected tokens until the budget is met."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Bool, Float, param
from mmprune.methods.tome import bipartite_merge, merge_to_budget


def pitome_energy(x: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """PiToMe's energy score of every token: ``E_i = mean_j ELU(cos(x_i, x_j) - margin, alpha)`` over all ``j``,
    ``i`` itself included (the code's ``F.elu(sim - margin, alpha).mean(-1)``)."""
    metric = F.normalize(x.float(), dim=-1)
    return F.elu(metric @ metric.T - margin, alpha=alpha).mean(dim=-1)


def pitome_merge(x: torch.Tensor, slots: torch.Tensor, size: torch.Tensor, r: int, margin: float, alpha: float,
                 weighted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PiToMe step (``2 r <= n``): the ``2 r`` tokens of highest energy are mergeable, the rest protected.
    The mergeable tokens, in descending energy, alternate into A (ranks 0, 2, ...) and B (ranks 1, 3, ...); every
    A token merges into its most cosine-similar B token (ToMe's :func:`bipartite_merge` with all ``r`` A tokens
    merging). Returns ``[protected in descending energy, B in descending energy]``: features, the original slot
    each output keeps, and how many original tokens each holds. Energy ties go to the earlier token."""
    order = torch.argsort(pitome_energy(x, margin, alpha), descending=True, stable=True)
    mergeable, protected = order[:2 * r], order[2 * r:]
    xb, slots_b, size_b = bipartite_merge(x[mergeable], slots[mergeable], size[mergeable], r, weighted)
    return (torch.cat([x[protected], xb]), torch.cat([slots[protected], slots_b]),
            torch.cat([size[protected], size_b]))


def step_r(n: int, k: int, ratio: float) -> int:
    """Tokens one step removes from ``n`` on the way to ``k``: the code's ``floor(n - n * ratio)``, at least 1 (the
    steps must reach the budget), at most ``n // 2`` and ``n - k``."""
    return min(max(1, math.floor(n - n * ratio)), n // 2, n - k)


@dataclass
class PiToMePruner(PreLLMPruner):
    """Merge each image's tokens PiToMe's way, protecting the low-energy (isolated) tokens, until ``keep`` remain.

    Paper: "Accelerating Transformers with Spectrum-Preserving Token Merging" (Tran et al., NeurIPS 2024);
    reference code hchautran/PiToMe (``algo/pitome/merge.py``: ``pitome_vision``, ``pitome``; the LLaVA setup is
    ``algo/pitome/patch/clip_hf.py``, applied by ``tasks/vqa/lmms_eval/models/llava.py``).

    Rule (as the code), one step of ``r``: cosine similarities of all tokens; energy
    ``E_i = mean_j ELU(cos_ij - margin, alpha)`` (self included; ``alpha = 1``, the code's fixed default); tokens
    sorted by descending energy; the top ``2 r`` are mergeable, the rest are protected (kept unchanged); the
    mergeable ones alternate into A (even ranks) and B (odd ranks) and every A token merges into its most similar
    B token (``scatter_reduce``), so one step removes exactly ``r`` tokens. Output
    ``[protected in descending energy, B in descending energy]`` (the spatial order is not kept, as in the code;
    each output keeps the slot, and under ``positions="original"`` the position, of its original token). A step is
    :func:`pitome_merge`; its A/B merge is ToMe's :func:`~mmprune.methods.tome.bipartite_merge`.

    What the code does per layer, and what is done here:
      * **r per step**: the code removes ``r = floor(T - T * ratio)`` tokens at every encoder layer (one ``ratio``
        for all layers, swept 0.85 - 0.975 for LLaVA). Here the steps repeat on the projected tokens with
        ``r = floor(n - n * ratio)`` of the current ``n`` (at least 1, at most ``n // 2``, the last step clipped
        to reach ``keep`` exactly), energies recomputed every step; ``ratio`` defaults to 0.9. ``ratio=0.5`` gives
        ToMe's ``r = min(n - keep, n // 2)`` schedule, which at ``keep <= 0.5`` makes every token mergeable
        (``2 r = n``) so nothing is protected.
      * **margin**: the code's function default is 0.5 (``pitome_vision``); its encoder patches override it with a
        per-layer schedule ``m_l = c - c * l / L`` (``c = 0.9`` for the CLIP of LLaVA, 0.75 for DeiT, 0.95 for
        LAVIS's CLIP). There are no layers here: one ``margin`` (default 0.5) serves every step; the schedule's value
        at CLIP-L's feature layer (22 of 24) would be 0.075.
      * **metric and merge**: the LLaVA patch uses the layer's output hidden states (not keys) as the metric and
        ``merge_mean`` (plain ``scatter_reduce`` mean, no sizes); the timm patches use head-mean keys and the
        size-weighted ``merge_wavg``. Here the metric is the projected tokens and ``weighted=False`` (default) is
        the LLaVA patch's plain mean; ``weighted=True`` tracks sizes across steps as ``merge_wavg``.

    Deliberate differences: the reference merges inside the ViT (from the first layer, with ToMe's bipartite
    matching in layers 0 - 12 of the LLaVA CLIP and PiToMe after); as a pre-LLM method it runs only on the projected
    tokens. The code's [CLS] is kept out of the merge; LLaVA drops [CLS] before the projector, so there is none here.
    Ties: equal energies go to the earlier token (stable sort; the code's ``argsort`` leaves them unspecified),
    equal similarities to the earlier B token. LLaVA-NeXT's newline tokens are tokens like any other (as ToMe).
    """

    keep: int | float = 0.25
    margin: float = param(0.5, Float(-1.0, 1.0), "energy margin m in ELU(cos - m, alpha) (the code's default 0.5)")
    alpha: float = param(1.0, Float(0.0), "ELU alpha of the energy score (the code's 1.0)")
    ratio: float = param(0.9, Float(0.5, 1.0, high_open=True),
                         "share of the tokens one step keeps: r = floor(n - n * ratio), at least 1")
    weighted: bool = param(False, Bool(), "size-weighted means across steps (merge_wavg); False: the LLaVA patch's "
                                          "plain mean (merge_mean)")

    name: ClassVar[str] = "pitome"
    summary: ClassVar[str] = "energy-protected merging of the projected tokens down to the budget (PiToMe)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        return merge_to_budget(tokens, k, lambda x, slots, size: pitome_merge(
            x, slots, size, step_r(x.shape[0], k, self.ratio), self.margin, self.alpha, self.weighted))
