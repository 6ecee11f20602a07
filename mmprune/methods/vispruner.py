"""VisPruner: important tokens by encoder attention plus diverse tokens left after removing near-duplicates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.fastervlm import token_scores
from mmprune.methods.params import Float, param

PER_ROUND = 8  # duplicates removed per round (the code's `min(8, ...)`)


@dataclass
class VisPrunerPruner(PreLLMPruner):
    """Important + diverse tokens from visual cues only.

    Paper: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (ICCV 2025)
    (arXiv 2412.01818 v2, the extension of FasterVLM); reference code Theia-4869/VisPruner
    (``llava/model/llava_arch.py`` ``encode_images``, ``llava/model/multimodal_encoder/clip_encoder.py``,
    ``siglip_encoder.py``).

    Rule (as the code), for a budget ``T = k``:
      1. ``T_imp = int(T * important_ratio)`` important tokens: the top ones by the head-mean [CLS] attention at the
         feature layer (``attentions[-2]``, row [CLS], patch columns); ``T_div = T - T_imp``.
      2. The rest, in descending attention order, are the candidates for the diverse tokens. Similarity is the
         cosine of the pre-projector hidden states of the feature layer (``hidden_states[-2]``). While more than
         ``T_div`` candidates remain, one round: ``r = min(8, R - T_div)``; split the candidate list alternately
         into A (even positions) and B (odd); each A token's score is its largest similarity to any B token; the
         ``r`` A tokens with the largest scores are removed and the list becomes ``[the other A tokens in
         descending score order, B]`` (this order feeds the next round's split).
      3. Keep important + remaining candidates, in original order (the code's boolean mask).
    Defaults: ``important_ratio = 0.5`` (the code's argparse default); budget 128 of 576 (the README's first example,
    64 important + 64 diverse; the code's own default 576 prunes nothing), as a fraction.

    Deliberate differences:
      * Ties (equal attention, equal A scores) go to the lower index / earlier list position (stable sorts; the
        code's ``argsort`` leaves them unspecified).
      * ``r`` is also capped at the size of A (``ceil(R / 2)``): the reference's indexing fails when ``R`` is odd
        or ``r`` exceeds A, which LLaVA-1.5's 576 tokens at its even budgets never reach but small images do.
    Families:
      * LLaVA-NeXT: the reference prunes each crop (base and high-res) to ``T`` tokens with its own [CLS] and always
        keeps the newline tokens on top of the budget. Here the budget is global over the image's tokens (the
        FasterVLM convention of this library): important tokens are ranked by their own crop's [CLS] attention, the
        duplicate removal runs once over all remaining patches (each with its own crop's hidden state), and newline
        tokens are not kept (unless ``k`` exceeds the other tokens).
      * No [CLS] (Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision): the code's SigLIP path ranks by the attention each
        token receives (``attentions[-1].mean(dim=-2)``, then the head mean); here that is the adapters'
        ``token_attention`` (received attention at the last vision block on Qwen, at the feature layer on
        OneVision). These families expose no pre-projector features per token, so similarity is on the LLM-input
        embeddings (post-merger / post-projector).
    """

    keep: int | float = 128 / 576
    important_ratio: float = param(0.5, Float(0.0, 1.0),
                                   "share of the budget kept as important tokens (int(k * ratio)); the rest diverse")

    name: ClassVar[str] = "vispruner"
    summary: ClassVar[str] = "important tokens by encoder attention + diverse tokens by duplicate removal (VisPruner)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        scores = token_scores(tokens, reduce="mean")
        finite = torch.isfinite(scores)
        order = torch.argsort(scores, descending=True, stable=True)[: int(finite.sum())]
        important_count = int(k * self.important_ratio)
        diverse_count = k - important_count
        important, residual = order[:important_count], order[important_count:]
        if diverse_count > 0:
            features = tokens.get("vision_features") if tokens.has("vision_features") else tokens.embeds
            residual = remove_duplicates(features, residual, diverse_count)
        else:
            residual = residual[:0]
        kept = torch.cat([important, residual])
        if kept.numel() < k:  # only newline tokens are left to fill the budget
            kept = torch.cat([kept, (~finite).nonzero().squeeze(1)[: k - kept.numel()]])
        return Selection.of(kept)


def remove_duplicates(features: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """VisPruner's iterative matching: drop up to 8 A tokens per round (those most similar to some B token) until
    ``count`` of ``candidates`` remain; returns the survivors in the list order the rounds leave."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    while True:
        size = candidates.numel()
        r = min(PER_ROUND, size - count, (size + 1) // 2)
        if r <= 0:
            return candidates
        a, b = candidates[0::2], candidates[1::2]
        best = (x[a] @ x[b].T).max(dim=-1).values
        ranked = torch.argsort(best, descending=True, stable=True)
        candidates = torch.cat([a[ranked[r:]], b])
