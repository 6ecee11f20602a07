"""VisionZip: dominant tokens by encoder attention plus a few contextual tokens merged from the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import Selection, MediaItem
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Int, param
from mmprune.methods.fastervlm import token_scores


@dataclass
class VisionZipPruner(PreLLMPruner):
    """Dominant + contextual token merging.

    Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025); reference code
    dvlab-research/VisionZip.

    Rule (as the code, LLaVA-1.5):
      1. Dominant: the [CLS] token itself plus the top ``D - 1`` patches by ``sum_h A[h, CLS, i]`` at the feature
         layer (layer -2), in original order with [CLS] first.
      2. Contextual: over the ``R`` remaining patches, keys of that layer averaged over heads and L2-normalised;
         targets are the remaining-list positions ``0, s, 2s, ...`` (``s = max(1, R // C)``), first ``C``; every
         other token joins its most cosine-similar target; ``ctx_j = h_target + mean(h_members)`` (the target
         unchanged when nobody joins), on the pre-projector hidden states, then projected.
      3. Output ``[CLS, dominant, contextual]`` (D + C tokens).
    Budget split: the README pairs (54, 10) for 64 tokens and the paper (108, 20), (162, 30) for 128 and 192, i.e.
    ``C = round(k * 10 / 64)``; ``contextual`` overrides it.

    Families:
      * LLaVA-NeXT: the reference prunes every crop separately with its own [CLS] and drops the newline tokens. Here
        the budget is global over the image (dominant patches ranked by their own crop's [CLS] attention, keys and
        hidden states of their own crop), crops' [CLS] tokens are not added, and newline tokens are not kept.
      * Qwen2-VL / Qwen2.5-VL (no [CLS]; no official port): as VisionSelector's Qwen2.5-VL port, dominant tokens are
        ranked by the attention each merged token receives at the last vision block (head-mean), contextual tokens
        are merged from the post-merger embeddings with last-block keys, and the split is
        ``C = max(1, int(0.05 * N))``, ``D = k - C``.

    Slots: [CLS] takes the slot of the first dominant patch; a contextual token takes its target's slot.
    """

    keep: int | float = 64 / 576
    contextual: int | None = param(None, Int(0, optional=True),
                                   "contextual (merged) tokens (default: round(k * 10 / 64), 5% without [CLS])")

    name: ClassVar[str] = "visionzip"
    summary: ClassVar[str] = "dominant tokens by encoder attention + merged contextual tokens (VisionZip)"

    def split(self, tokens: MediaItem, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget of ``k`` output tokens."""
        if self.contextual is not None:
            contextual = self.contextual
        elif tokens.has("cls_feature"):
            contextual = round(k * 10 / 64)
        else:
            contextual = max(1, int(0.05 * tokens.num_tokens))
        dominant = k - contextual
        min_dominant = 2 if tokens.has("cls_feature") else 1  # [CLS] + at least one patch
        if dominant < min_dominant:
            raise ValueError(
                f"visionzip: budget k={k} leaves {dominant} dominant tokens after {contextual} contextual ones; "
                f"expected contextual <= {k - min_dominant}"
            )
        return dominant, contextual

    def select(self, tokens: MediaItem, k: int) -> Selection:
        dominant_count, contextual_count = self.split(tokens, k)
        with_cls = tokens.has("cls_feature")
        scores = token_scores(tokens, reduce="sum")
        candidates = int(torch.isfinite(scores).sum())
        patches = dominant_count - int(with_cls)
        if patches + contextual_count > candidates:
            raise ValueError(f"visionzip: k={k} exceeds the {candidates} tokens that can be scored in this image")
        dominant = torch.sort(torch.topk(scores, patches).indices).values

        remaining = torch.ones_like(scores, dtype=torch.bool)
        remaining[dominant] = False
        remaining &= torch.isfinite(scores)
        rest = remaining.nonzero().squeeze(1)

        merge_pre_projector = tokens.has("vision_features")
        hidden = tokens.get("vision_features") if merge_pre_projector else tokens.embeds
        metric = tokens.get("vision_keys")
        targets, contextual = merge_contextual(metric[rest], hidden[rest], contextual_count)

        parts = []
        if with_cls:
            parts.append(tokens.project(tokens.get("cls_feature").unsqueeze(0)))
        parts.append(tokens.embeds[dominant])
        if contextual_count:
            parts.append(tokens.project(contextual) if merge_pre_projector else contextual)
        embeds = torch.cat([p.to(tokens.embeds.dtype) for p in parts])

        slots = torch.cat([dominant[:1]] * int(with_cls) + [dominant, rest[targets]])
        return Selection(slots=slots, embeds=embeds, merged=contextual_count + int(with_cls))


def merge_contextual(metric: torch.Tensor, hidden: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge over the remaining tokens: returns (target positions in ``rest``, merged)."""
    r = metric.shape[0]
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=metric.device), hidden[:0]
    step = max(1, r // count)
    targets = torch.arange(0, r, step, device=metric.device)[:count]
    is_target = torch.zeros(r, dtype=torch.bool, device=metric.device)
    is_target[targets] = True
    normed = F.normalize(metric.float(), dim=-1)
    members = (~is_target).nonzero().squeeze(1)
    assign = (normed[members] @ normed[targets].T).argmax(dim=1)
    one_hot = F.one_hot(assign, num_classes=targets.numel()).to(torch.float32)
    counts = one_hot.sum(0).clamp(min=1).unsqueeze(1)
    aggregated = one_hot.T @ hidden[members].float() / counts
    return targets, (hidden[targets].float() + aggregated).to(hidden.dtype)
