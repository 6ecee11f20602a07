"""VTC-CLS: keep the tokens the [CLS] token attends to most, summed over the vision encoder's later layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Int, param

REFERENCE_START, REFERENCE_DEPTH = 16, 24  # the code's default --layer, for CLIP ViT-L/14 (24 layers)


def start_layer(start: int | None, depth: int) -> int:
    """The first summed layer: ``start``, or the reference's 16 of 24 scaled to ``depth``; at most ``depth - 2`` so
    at least one layer is summed."""
    chosen = round(REFERENCE_START * depth / REFERENCE_DEPTH) if start is None else start
    return min(chosen, depth - 2)


@dataclass
class VTCCLSPruner(PreLLMPruner):
    """Keep the top-``keep`` tokens by [CLS] attention summed over encoder layers ``start_layer`` .. ``L - 2``.

    Paper: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (arXiv 2412.05819); reference
    code THU-MIG/VTC-CLS (``clip_encoder.py`` ``cls_token_only``, ``llava_arch.py`` ``encode_images``).

    Rule (as the code): ``s = sum_{l = start}^{L-2} mean_heads A_l[CLS, patches]`` (``attentions[start:-1]``: the
    last layer is left out), the ``keep`` highest-scoring patches stay, re-sorted to their original order (kept
    tokens keep their positions' order; LLaVA renumbers them). ``start_layer`` defaults to the code's ``--layer``
    default, 16 of CLIP-L's 24 layers, scaled to the tower's depth (and at most ``L - 2``).

    Deliberate differences: the [CLS] rows are recomputed from each layer's hooked input (the tower keeps its
    attention implementation; the code asks for ``output_attentions``); batches of any size (the code squeezes a
    batch of one); ties go to the earlier token. LLaVA-NeXT: each packed token takes its own crop's rows, newline
    tokens are never kept. Towers without [CLS] (Qwen2-VL, LLaVA-OneVision): the family's single-layer substitute
    (``token_attention``: the attention each token receives) replaces the sum, as for FasterVLM.
    """

    keep: int | float = 0.25
    start_layer: int | None = param(None, Int(0, optional=True),
                                    "first encoder layer summed (default: 16 of 24, scaled to the tower's depth)")

    encoder_fields: ClassVar[tuple[str, ...]] = ("cls_attention_by_layer",)
    name: ClassVar[str] = "vtc_cls"
    summary: ClassVar[str] = "top-k by [CLS] attention summed over the encoder's later layers (VTC-CLS)"

    def select(self, tokens: MediaItem, k: int) -> Selection:
        if tokens.has("cls_attention_by_layer"):
            rows = tokens.get("cls_attention_by_layer")  # per layer (heads, N), computed when read
            depth = len(rows)
            if self.start_layer is not None and self.start_layer > depth - 2:
                raise ValueError(f"vtc_cls: start_layer={self.start_layer} leaves no layer to sum in a "
                                 f"{depth}-layer vision tower: expected 0..{depth - 2}")
            scores = sum(rows[layer].float().mean(dim=0) for layer in range(start_layer(self.start_layer, depth),
                                                                                depth - 1))
        else:
            scores = tokens.token_attention.float().mean(dim=0)
        for segment in tokens.segments:  # newline tokens carry no attention: never kept
            newlines = segment.newline_indices()
            if newlines.numel():
                scores[newlines.to(scores.device)] = float("-inf")
        order = torch.argsort(scores, descending=True, stable=True)
        return Selection.of(order[:k])
