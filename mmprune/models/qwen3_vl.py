"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and the MoE variant): Qwen2-VL's token layout, a vision tower
without windows feeding DeepStack, and a decoder with per-head q/k norms."""

from __future__ import annotations

import torch
from torch import nn

from mmprune import upstream
from mmprune.models.qwen2_vl import Qwen2VLAdapter


class DeepStackMixin:
    """For families whose vision tower adds per-layer features at the visual positions after the first decoder
    layers (DeepStack): pre-LLM pruning keeps each surviving visual token's rows (a merged token, its slot token's);
    an in-LLM stage inside those layers is refused by the engine (``deepstack_layers``)."""

    def deepstack_count(self) -> int:
        return len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ())

    def compact_language_model_kwargs(self, kwargs: dict, source: torch.Tensor, compact_mask: torch.Tensor) -> None:
        upstream.compact_deepstack(kwargs, source, compact_mask)


class Qwen3VLAdapter(DeepStackMixin, Qwen2VLAdapter):
    """Qwen3-VL. Images and videos as Qwen2-VL (merged 2x2 tokens in raster order; a video's temporal grids in
    order; received attention at the last vision block, which has no windows), kept tokens keep their M-RoPE ids.
    Videos carry their frame times as text tokens between grids, not as an input (``time`` stays None); the grids
    of a video then sit apart in the sequence and stay in their own slots. DeepStack: see :class:`DeepStackMixin`;
    the attention rows in-LLM methods recompute apply the decoder's per-head ``q_norm``/``k_norm``.
    """

    family = "qwen3-vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.deepstack_layers = self.deepstack_count()
