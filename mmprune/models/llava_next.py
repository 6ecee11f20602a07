"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops packed with image-newline tokens."""

from __future__ import annotations

from typing import Any

import torch

from mmprune import upstream
from mmprune.media import MediaItem, PerLayer, Segment
from mmprune.models.llava import LlavaAdapter


def packed_segments(valid: torch.Tensor, side: int) -> list[Segment]:
    """The segments of a LLaVA-NeXT/OneVision packed image, from its ``valid`` mask (False on newline tokens):
    the base grid, then either one newline (the image was encoded as its base crop alone) or the high-res grid
    whose rows each end with a newline."""
    base = side * side
    n = valid.numel()
    if n == base + 1:
        return [Segment(0, side, side), Segment(base, 1, 0, newline=True)]
    rows = int((~valid[base:]).sum())
    cols = (n - base) // rows - 1
    return [Segment(0, side, side), Segment(base, rows, cols, newline=True)]


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT. An image's visual tokens are, in order, the base image's grid (when the image has high-res
    crops) and the unpadded high-res grid whose rows each end with an image-newline token, exactly as the model's
    ``pack_image_features`` lays them out. The budget counts all of them (2880 -> 640/320/160).

    Lazy fields map every packed token back to its crop and patch by packing an index map through the model's own
    ``pack_image_features``, so they follow HF's unpadding exactly. Newline tokens have no [CLS] attention, keys or
    features (zeros); ``segments`` tells methods where they are.
    """

    family = "llava-next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    default_positions = "renumber"

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        crops = [upstream.llava_next_crops(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
                 for size in image_sizes]
        per_crop = self.side * self.side + int(self.strategy == "full")
        # index map: value 1 + (global crop * per_crop + patch); newline tokens come out as 0
        maps, start = [], 0
        for count in crops:
            ids = torch.arange(start * per_crop, (start + count) * per_crop, dtype=torch.float64) + 1
            maps.append(ids.view(count, per_crop, 1))
            start += count
        packed = upstream.llava_next_pack(self.inner, maps, image_sizes, self.strategy,
                                          image_newline=torch.zeros(1, dtype=torch.float64))
        store = self.captured
        images = []
        for i, (embeds, index) in enumerate(zip(upstream.image_features(output), packed)):
            source = index[:, 0].round().long() - 1  # -1 = newline
            segments = packed_segments(source >= 0, self.side)
            images.append(MediaItem(embeds, segments, family=self.family,
                                       lazy=self._packed_lazy(store, source.to(embeds.device), per_crop),
                                       project=self.project))
        return images

    def _packed_lazy(self, store: dict, source: torch.Tensor, per_crop: int) -> dict:
        if self.clip is None:
            return {}
        first = 0 if self.strategy == "full" else 1
        valid = source >= 0
        crop = source.clamp(min=0) // per_crop
        patch = source.clamp(min=0) % per_crop + first

        def gather(table: torch.Tensor) -> torch.Tensor:  # table (crops, 1+N, ...) -> (tokens, ...)
            values = table[crop, patch]
            return values * valid.view(-1, *([1] * (values.dim() - 1))).to(values.dtype)

        lazy = {
            "token_attention": lambda: gather(self.clip_tables(store)[0].permute(0, 2, 1)).T,
            "vision_keys": lambda: gather(self.clip_tables(store)[1]),
            "vision_features": lambda: gather(store["clip_layer_out"]),
            "received_attention": lambda: gather(self.clip_received(store).permute(0, 2, 1)).T,
            # 0: the image's base crop, 1 + j: its j-th anyres sub-image (processor order), -1: newline (HiRED)
            "crop_index": lambda: torch.where(valid, crop - crop[valid].min(), -1),
        }
        if self.every_layer:
            lazy["cls_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: gather(self.clip_layer_rows(store, layer).permute(0, 2, 1)).T)
            lazy["received_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: gather(self.clip_received_layer(store, layer).permute(0, 2, 1)).T)
        if self.last_layer:  # each crop's own [CLS] row and keys; newline tokens get zeros
            lazy["last_layer_cls_attention"] = lambda: gather(self.clip_last_tables(store)[0])
            lazy["last_layer_keys"] = lambda: gather(self.clip_last_tables(store)[1])
        return lazy
