"""IDPruner: maximal marginal relevance between token importance and diversity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.fastervlm import token_scores
from mmprune.methods.params import Choice, Float, Int, param

IMPORTANCE = ("attention", "text")


@dataclass
class IDPrunerPruner(PreLLMPruner):
    """Greedy maximal marginal relevance (MMR) on the projected tokens, with a pluggable importance.

    Paper: "IDPruner: Harmonizing Importance and Diversity in Visual Token Pruning for MLLMs" (arXiv 2602.13315);
    reference code Tencent/AngelSlim ``angelslim/compressor/token_compressor/algorithm/idpruner.py`` (Apache-2.0;
    this is our own implementation of the rule, read at commit 67394ce).

    Rule (as the code), for a budget ``k`` of an image's ``N`` tokens:
      1. ``imp`` = importance min-max normalised: ``(s - min s) / (max s - min s + 1e-6)``.
      2. ``sim`` = cosine similarity of the LLM input embeddings (the code's ``inputs_embeds`` of the vision tokens).
      3. The first step takes the ``parallel_k`` tokens of highest ``imp``. Every later step takes the
         ``parallel_k`` unselected tokens of highest ``mmr_lambda * imp_i - (1 - mmr_lambda) * max_{s in S} sim_is``
         (the last step only what the budget has left); ``max_{s in S} sim`` is updated after each step.
      4. Kept tokens in original order (the code returns a keep mask).
    Defaults as the code's configs: ``mmr_lambda = 0.5``, ``parallel_k = 1``, ``keep = 0.25`` (``ratio: 0.75``).

    Importance (``importance``), the deliberate difference: AngelSlim scores tokens with a trained VisionSelector
    scorer (arXiv 2510.16598; checkpoints ``AngelSlim/Qwen2.5-VL-{3B,7B}-Instruct-Selector``, its raw output on the
    visual embeddings alone, no text). No such checkpoint is loaded here, so results are not the paper's
    (its 95.18% at 25% on Qwen2.5-VL-7B rests on the scorer). The importance is one of two training-free scores:
      * ``"attention"`` (default): the head-mean attention of the vision encoder, as FasterVLM and VisPruner rank:
        [CLS] attention at the feature layer on CLIP towers (LLaVA, LLaVA-NeXT: each patch by its own crop's [CLS]);
        on towers without [CLS] (Qwen2-VL / Qwen2.5-VL, OneVision) the attention each token receives, the
        adapters' ``token_attention``. Reads no text.
      * ``"text"``: relevance to the user's instruction in the LLM input space, the mean cosine similarity of each
        visual embedding to the instruction tokens' input embeddings (``item.prompt.instruction_embeds``); our
        option, from neither the paper nor AngelSlim. Only with this option does the method read the prompt:
        ``reads_prompt`` is set on the instance (the class default, for ``"attention"``, is False), so the engine
        builds the prompt text only when it is read.

    Other deliberate differences:
      * Ties (equal importance or MMR scores) go to the lowest index (a stable sort; ``torch.topk``'s order among
        equal values is unspecified in the code). Similarities are computed in float32.
      * LLaVA-NeXT newline tokens have no attention score: with ``"attention"`` they are not candidates (kept only
        if ``k`` exceeds the patches), as FasterVLM here. AngelSlim covers LLaVA-1.5 and Qwen2.5-VL only.
      * The budget is per image (``keep`` of each image's tokens); AngelSlim runs one selection over all the
        vision tokens of a (batch-1) prompt, so its multi-image prompts share one budget.
    """

    keep: int | float = 0.25
    mmr_lambda: float = param(0.5, Float(0.0, 1.0),
                           "weight of importance against redundancy (max cosine to the kept tokens) in the MMR score")
    parallel_k: int = param(1, Int(1), "tokens taken per greedy step (the top parallel_k MMR scores)")
    importance: str = param("attention", Choice(options=IMPORTANCE),
                            "'attention': head-mean encoder [CLS]/received attention; 'text': mean cosine of each "
                            "visual embedding to the instruction's input embeddings (reads the prompt)")

    name: ClassVar[str] = "idpruner"
    summary: ClassVar[str] = "greedy maximal marginal relevance of importance and cosine redundancy (IDPruner)"

    def __post_init__(self) -> None:
        super().__post_init__()
        # reads_prompt is a class-level default (False: the default importance reads no text); the "text" importance
        # needs the prompt, and the engine asks the instance
        self.reads_prompt = self.importance == "text"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        scores = self.importance_scores(tokens)
        candidates = torch.isfinite(scores).nonzero().squeeze(1)
        kept = candidates[mmr_select(tokens.embeds[candidates], scores[candidates], min(k, candidates.numel()),
                                     self.mmr_lambda, self.parallel_k)]
        if kept.numel() < k:  # only tokens without a score (LLaVA-NeXT newlines) are left to fill the budget
            kept = torch.cat([kept, (~torch.isfinite(scores)).nonzero().squeeze(1)[: k - kept.numel()]])
        return Selection.of(kept)

    def importance_scores(self, tokens: MediaItem) -> torch.Tensor:
        """Raw importance per token (``-inf``: not a candidate)."""
        if self.importance == "attention":
            return token_scores(tokens, reduce="mean")
        return text_relevance(tokens.embeds, self.prompt_of(tokens).instruction_embeds)


def text_relevance(visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """``(N,)`` mean cosine similarity of each visual embedding to the instruction token embeddings ``(I, D)``."""
    v = visual.float()
    w = instruction.to(v.device).float()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (v @ w.T).mean(dim=1)


def mmr_select(features: torch.Tensor, scores: torch.Tensor, k: int, mmr_lambda: float,
               parallel_k: int = 1) -> torch.Tensor:
    """IDPruner's greedy MMR: indices of ``k`` tokens in pick order (see :class:`IDPrunerPruner`)."""
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    s = scores.float()
    importance = (s - s.min()) / (s.max() - s.min() + 1e-6)
    x = features.float()
    x = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = x @ x.T
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    redundancy = torch.zeros(n, device=scores.device)  # max cosine to the chosen tokens (unused before a pick)
    order: list[torch.Tensor] = []
    taken = 0
    while taken < k:
        step = min(parallel_k, k - taken)
        mmr = importance.clone() if taken == 0 else mmr_lambda * importance - (1 - mmr_lambda) * redundancy
        mmr = mmr.masked_fill(chosen, float("-inf"))
        best = torch.argsort(mmr, descending=True, stable=True)[:step]
        order.append(best)
        chosen[best] = True
        picked_max = similarity[:, best].max(dim=1).values
        redundancy = picked_max if taken == 0 else torch.maximum(redundancy, picked_max)
        taken += step
    return torch.cat(order)
