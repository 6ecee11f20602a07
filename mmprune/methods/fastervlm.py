"""FasterVLM: keep the tokens the vision encoder's [CLS] attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner


@dataclass
class FasterVLMPruner(PreLLMPruner):
    """[CLS]-attention top-k.

    Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster"
    (arXiv 2412.01818); reference code Theia-4869/FasterVLM.

    Rule (as the code): ``s_i = mean_h A[h, CLS, i]`` at the vision feature layer (``attentions[-2]`` for
    ``vision_feature_layer=-2``), top-``k`` tokens, kept in original order. Default budget 25% (R = 75%).

    Families:
      * LLaVA-1.5: exactly the reference.
      * LLaVA-NeXT: every patch is scored by its own crop's [CLS] row, as the reference does per crop, but the budget
        is global over the image's tokens (the issue's 2880 -> 640/320/160 convention) instead of the reference's
        per-crop ``T``. The reference never builds newline tokens (its merge type is hard-coded to ``spatial``); in
        the HF layout they carry no [CLS] score and are not kept.
      * Qwen2-VL / Qwen2.5-VL have no [CLS]. Following VisPruner's no-[CLS] fallback (its SigLIP path, by the same
        authors), the score is the mean attention each token *receives* from all tokens of its image at the last
        vision block, averaged over heads; patch scores are averaged within each 2x2 merge unit.
    """

    keep: int | float = 0.25

    name: ClassVar[str] = "fastervlm"
    summary: ClassVar[str] = "top-k by the vision encoder's [CLS] attention (FasterVLM)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        scores = token_scores(tokens, reduce="mean")
        return Selection.of(torch.topk(scores, k).indices)


def token_scores(tokens: MediaItem, reduce: str) -> torch.Tensor:
    """Head-reduced encoder attention per token; tokens without a score (LLaVA-NeXT newlines) get ``-inf``."""
    attention = tokens.token_attention.float()
    scores = attention.mean(0) if reduce == "mean" else attention.sum(0)
    for segment in tokens.segments:
        newlines = segment.newline_indices()
        if newlines.numel():
            scores[newlines.to(scores.device)] = float("-inf")
    return scores
