"""Sparsity Meets Similarity: keep the head of the long-tailed [CLS]-similarity curve, cut at its knee."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner


def knee_count(curve: torch.Tensor) -> int:
    """Tokens ranked before the knee of ``curve`` (similarities sorted in descending order).

    The knee is the point farthest below the chord from the first point to the last (the largest perpendicular
    distance; it is the same point whatever the axes' scales, since the distance to a line is proportional to the
    vertical gap ``chord - curve``); the tokens ranked strictly before it are the head. Ties go to the first such
    point. A curve never below its chord (flat, straight or concave: no long tail) has no knee: every token counts.
    """
    n = curve.numel()
    if n <= 2:
        return n
    curve = curve.double()
    t = torch.arange(n, dtype=torch.float64, device=curve.device) / (n - 1)
    gap = curve[0] + (curve[-1] - curve[0]) * t - curve
    knee = int(torch.argmax(gap))
    return knee if float(gap[knee]) > 1e-9 * float(curve[0] - curve[-1]) else n  # rounding is not a knee


def cls_similarity(tokens: MediaItem, valid: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Cosine similarity of each token to [CLS] (or to the substitute reference) and what was used."""
    if tokens.has("vision_features"):
        features, where = tokens.get("vision_features").float(), "pre-projector features"
    else:
        features, where = tokens.embeds.float(), "projected tokens"
    if tokens.has("cls_feature"):
        reference, what = tokens.get("cls_feature").float(), "[CLS]"
    else:
        reference, what = features[valid].mean(dim=0), "the mean token"
    scores = F.cosine_similarity(features, reference.unsqueeze(0), dim=-1)
    return scores.masked_fill(~valid, float("-inf")), f"cosine to {what} ({where})"


@dataclass
class SMSPruner(PreLLMPruner):
    """Keep each image's tokens most similar to [CLS], as many as the knee of the sorted similarity curve says.

    Paper: "Sparsity Meets Similarity: Leveraging Long-Tail Distribution for Dynamic Optimized Token Representation
    in Multimodal Large Language Models" (Yu, Chen, Xu; arXiv 2409.01162). No reference code was found (the
    abstract promises it "upon acceptance"; none in the stored indexes), and the paper's full text was not
    available either: the rule below is this library's reading of the abstract, every unverified choice stated.

    Rule (the paper's first, pre-LLM round): the similarity of every visual token to [CLS] is long-tailed (few
    tokens are very similar); sort it in descending order and keep the tokens before the curve's inflection point,
    so the count adapts to the image. Readings:
      * **similarity**: cosine between the [CLS] hidden state and each patch's hidden state at the LLaVA feature
        layer (``vision_feature_layer``, -2), i.e. the pre-projector features LLaVA projects (the [CLS] is
        dropped before the projector, so there is no projected [CLS] to compare with).
      * **inflection point**: :func:`knee_count`, the point of the sorted curve farthest below the chord from its
        first to its last point (a Kneedle-style maximum distance); the tokens ranked before it stay. A curve
        with no point below its chord (no long tail) keeps every token, up to ``keep``.
      * kept tokens are re-sorted to their original order (as top-k references do); ties in similarity go to
        the earlier token.

    ``keep`` is an **upper bound**: an image keeps ``min(knee count, keep)`` tokens. Its ``after`` in ``stats``
    is the real count, and its ``note`` gives the knee count and whether the knee or the cap decided. The default
    cap is half of each image's tokens (the paper reports 22% of the tokens on average, so by default the knee
    decides); ``keep=1.0`` is the identity, as for every method, not "no cap" (for the knee alone, pass a fraction
    that rounds to fewer tokens than the image has, e.g. ``0.99`` for 576 tokens).

    Not implemented: the paper's second round, inside the LLM, drops visual tokens of low visual-text
    correlation. Neither the layer nor the correlation score is given in the abstract, and without code or full
    text any choice would be an invention; this class is the pre-LLM round only.

    Families: LLaVA-1.5 as above. Without a [CLS] feature (LLaVA-NeXT, whose per-crop [CLS] states the adapter does
    not expose; Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision, whose towers have no [CLS]) the reference vector is the
    mean of the image's tokens, on the pre-projector features where the adapter gives them (LLaVA-NeXT) and on the
    projected tokens otherwise: a documented substitute (the global summary [CLS] stands for), not the paper's
    rule. One curve covers the whole image (LLaVA-NeXT: base and high-res grids together); newline tokens are not
    on the curve and never kept. Under ``vision_feature_select_strategy="full"`` the [CLS] is the image's token 0
    and no separate [CLS] feature is given, so the substitute applies there too.
    """

    keep: int | float = 0.5

    name: ClassVar[str] = "sms"
    summary: ClassVar[str] = "tokens before the knee of the sorted [CLS]-similarity curve, adaptive count (SMS)"
    keep_means: ClassVar[str] = "most visual tokens kept per image (the knee of each image's curve decides)"
    variable_counts: ClassVar[bool] = True  # an image may keep fewer tokens than keep

    def select(self, tokens: MediaItem, k: int) -> Selection:
        valid = torch.ones(tokens.num_tokens, dtype=torch.bool, device=tokens.embeds.device)
        for segment in tokens.segments:
            newlines = segment.newline_indices()
            if newlines.numel():
                valid[newlines.to(valid.device)] = False
        scores, how = cls_similarity(tokens, valid)
        order = torch.argsort(scores, descending=True, stable=True)[:int(valid.sum())]
        knee = knee_count(scores[order])
        count = min(knee, k)
        selection = Selection.of(order[:count])
        decided = "the knee" if knee <= k else f"the cap keep={self.keep!r}"
        selection.note = (f"adaptive count: the knee of the sorted {how} curve is after {knee} of "
                          f"{int(valid.sum())} tokens; {count} kept ({decided} decided)")
        return selection
