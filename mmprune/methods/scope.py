"""SCOPE: greedy saliency-weighted coverage of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.fastervlm import token_scores
from mmprune.methods.params import Float, param


@dataclass
class SCOPEPruner(PreLLMPruner):
    """Saliency-coverage oriented selection.

    Paper: "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs" (NeurIPS 2025,
    arXiv 2510.24214); reference code kinredon/SCOPE (``scope/clip_encoder.py``: ``CLIPVisionTower_SCOPE``,
    ``SCOPE``; no license file, so this is a clean-room implementation of the published rule) and its port in
    Tencent/AngelSlim ``angelslim/compressor/token_compressor/algorithm/scope.py`` (the Qwen2.5-VL path).

    Rule (as the code): with ``sim`` the cosine similarity between the tokens' features and ``a`` the saliency,
    the coverage of a set is ``f(S) = sum_i max(0, max_{s in S} sim_is)``. Starting from ``S`` empty (``c_i = 0``),
    each step takes the unselected token with the largest SCOPE score
    ``gain_j * a_j ** alpha``, ``gain_j = sum_i max(0, sim_ij - c_i)`` (the coverage it adds), then
    ``c_i = max(c_i, sim_ij)``; ``k`` steps; kept in original order. Default ``alpha = 1`` (the scripts'
    ``ALPHA=1.0``), budget 64 of 576 (the README's example and the paper's headline 9x reduction), as a fraction.

    What the saliency and features are:
      * LLaVA-1.5: ``a`` = [CLS] attention at the feature layer (``attentions[-2]``, [CLS] row, patch columns),
        features = the feature layer's hidden states (``hidden_states[-2]``, pre-projector), as the reference.
        The reference sums the heads; the head mean here is the same ranking (a constant factor ``H ** alpha``).
      * No [CLS] (Qwen2-VL / Qwen2.5-VL, OneVision): ``a`` = the attention each token receives at the last vision
        block (the adapters' ``token_attention``, merged 2x2 units), features = the LLM input embeddings (no
        pre-projector features per merged token), as AngelSlim's Qwen2.5-VL config (``layer_idx: -1``,
        ``inputs_embeds``). AngelSlim sums over queries and over each merge unit where the adapter averages: a
        constant factor per image, so the same choice; AngelSlim averages the queries before the softmax for an
        image of 6144 patches or more (an approximation), the adapter never does.
      * LLaVA-NeXT: each patch by its own crop's [CLS] row and hidden state; one selection over the whole image
        (the library's global budget) where the reference selects per crop with the same count each; newline
        tokens (no [CLS] score, absent from the reference) are left out and kept only if ``k`` exceeds the
        patches.

    Reads no text (nor does either reference): ``reads_prompt`` is False.

    Deliberate differences: ties go to the lowest index (``argmax``'s first maximum, as the code); sums are in
    float32 (the code runs in the model's dtype); a zero feature vector has similarity 0 to every token (the code
    divides by its zero norm). The code's ``COMBINED=add`` ablation (``gain + a ** alpha``) is not offered: the
    paper's score is the product. AngelSlim runs one selection over all the vision tokens of a (batch-1) prompt;
    here each image has its own budget.
    """

    keep: int | float = 64 / 576
    alpha: float = param(1.0, Float(0.0), "exponent of the saliency in the SCOPE score (0: coverage alone)")

    name: ClassVar[str] = "scope"
    summary: ClassVar[str] = "greedy coverage gain x encoder attention ** alpha on the visual features (SCOPE)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        saliency = token_scores(tokens, reduce="mean")
        candidates = torch.isfinite(saliency).nonzero().squeeze(1)
        features = tokens.get("vision_features") if tokens.has("vision_features") else tokens.embeds
        picked = scope_select(features[candidates.to(features.device)], saliency[candidates],
                              min(k, candidates.numel()), self.alpha)
        kept = candidates[picked.to(candidates.device)]
        if kept.numel() < k:  # only tokens without a score (LLaVA-NeXT newlines) are left to fill the budget
            kept = torch.cat([kept, (~torch.isfinite(saliency)).nonzero().squeeze(1)[: k - kept.numel()]])
        return Selection.of(kept)


def scope_select(features: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0) -> torch.Tensor:
    """SCOPE's greedy selection: indices of ``k`` tokens in pick order (see :class:`SCOPEPruner`)."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = x @ x.T
    weight = saliency.to(x.device).float() ** alpha
    n = similarity.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    covered = torch.zeros(n, device=x.device)  # c_i: best similarity of token i to the chosen set, floored at 0
    order = []
    for _ in range(k):
        gain = (similarity - covered.unsqueeze(1)).clamp_min(0).sum(dim=0)
        score = (gain * weight).masked_fill(chosen, float("-inf"))
        best = int(torch.argmax(score))
        order.append(best)
        chosen[best] = True
        covered = torch.maximum(covered, similarity[best])
    return torch.tensor(order, dtype=torch.long, device=x.device)
