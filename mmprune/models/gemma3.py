"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP -> average pooling to 256 tokens -> RMSNorm + linear ->
Gemma 3 decoder (sliding-window and global layers, bidirectional attention among an image's tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, Segment
from mmprune.models.base import ModelAdapter, once
from mmprune.models.llava import ClipTower


class Gemma3Adapter(ModelAdapter):
    """Gemma 3. **An image is one run of 256 ``<image_soft_token>``** (``mm_tokens_per_image``) between
    ``<start_of_image>`` and ``<end_of_image>``: SigLIP's 64 x 64 patches (896 px) average-pooled 4 x 4 into a 16 x 16
    grid, one segment. With pan-and-scan, the processor adds each crop as another image with its own run after text
    ("here are some crops..."); nothing in the model's inputs says which crops belong together, so **each crop is
    pruned as an image of its own** (a ratio budget gives the same total; an absolute ``keep`` applies per crop).

    Encoder statistics (SigLIP has no [CLS]): ``token_attention`` / ``received_attention`` are the mean attention
    each patch receives from every patch of its image at the last SigLIP layer (the features the model reads are
    that layer's output after the post-layernorm), head by head, **summed** over the 4 x 4 patches a token pools
    (the mass its patches receive, as InternVL's pixel-shuffled tokens); ``vision_keys`` the mean of those
    patches' head-mean keys; ``vision_features`` the pooled vectors the projector's RMSNorm and linear map read
    (``project`` applies them, so merging methods merge before the projection as on LLaVA).

    In the language model, image tokens see every token of their own image at prefill (bidirectional block) and
    the rest causally; global layers see the whole prompt, local layers a sliding window. After pruning, the
    kept tokens of an image stay one block (``mask_blocks``); the engine rebuilds Gemma 3's per-layer-type masks
    for the compacted prompt, each stage and each decode step, with the model's own mask functions. Positions
    are 1-D RoPE (``renumber`` by default, as LLaVA).
    """

    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    default_positions = "renumber"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vision = self.config.vision_config
        self.patch_side = int(vision.image_size // vision.patch_size)
        self.side = int(round(int(self.config.mm_tokens_per_image) ** 0.5))
        self.pool = self.patch_side // self.side  # patches per token along each axis
        # the patches (row-major indices in the image's patch grid) each token pools, pushed through the model's
        # own pooling so the layout follows it exactly
        grid = torch.arange(self.patch_side ** 2, dtype=torch.float64).view(1, -1, 1)
        corners = upstream.gemma3_pool(self.inner, grid)[0, :, 0]  # mean index of each token's patches
        offsets = torch.tensor([r * self.patch_side + c for r in range(self.pool) for c in range(self.pool)],
                               dtype=torch.float64)
        first = corners - offsets.mean()
        self.token_patches = (first[:, None] + offsets[None, :]).round().long()  # (T, pool * pool)
        self.clip = ClipTower(self.inner.vision_tower, -1)

    def install_capture(self, extra: tuple[str, ...] = ()) -> list:
        return self.clip.install(self)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return upstream.gemma3_project(self.inner, features)

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        features = upstream.image_features(output)
        hidden = upstream.vision_last_hidden_state(output)
        store = self.captured
        index = self.token_patches

        def received() -> tuple[torch.Tensor, torch.Tensor]:
            return once(store, "received", lambda: self.clip.received_attention_and_keys(store))

        def attention(i: int) -> torch.Tensor:  # (heads, P) -> (heads, T): the mass each token's patches receive
            table = received()[0][i]
            return table[:, index.to(table.device)].sum(-1)

        def keys(i: int) -> torch.Tensor:
            table = received()[1][i]
            return table[index.to(table.device)].mean(1)

        images = []
        for i, embeds in enumerate(features):
            if embeds.shape[0] != self.side * self.side:
                raise ValueError(f"a Gemma 3 image produced {embeds.shape[0]} features, expected "
                                 f"{self.side * self.side} (mm_tokens_per_image)")
            lazy = {
                "token_attention": lambda i=i: attention(i),
                "received_attention": lambda i=i: attention(i),
                "vision_keys": lambda i=i: keys(i),
                "vision_features": lambda i=i: upstream.gemma3_pool(self.inner, hidden[i:i + 1])[0],
            }
            images.append(MediaItem(embeds, [Segment(0, self.side, self.side)], family=self.family, lazy=lazy,
                                    project=self.project))
        return images

    @staticmethod
    def captured_length(arguments: dict) -> int:
        return int(arguments["input_ids"].shape[1])

    def mask_blocks(self, arguments: dict, source: torch.Tensor, compact_mask: torch.Tensor) -> torch.Tensor | None:
        """Gemma 3's image blocks, from the compacted ``token_type_ids`` (1 at image tokens) with the model's own
        rule (a block is a run of consecutive image tokens); without ``token_type_ids`` the model is causal, so are
        we."""
        types = arguments.get("token_type_ids")
        if types is None:
            return None
        length = self.captured_length(arguments)
        if types.shape[1] < length:  # shorter than the prompt (the model pads its block ids the same way)
            types = nn.functional.pad(types, (0, length - types.shape[1]))
        types = types.to(source.device).gather(1, source).masked_fill(~compact_mask, 0)
        return upstream.gemma3_blocks(types)
