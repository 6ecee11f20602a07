"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres-max images with newline
tokens, videos pooled after the projector and closed by one newline token."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, Segment
from mmprune.models.base import once
from mmprune.models.llava import LlavaAdapter
from mmprune.models.llava_next import packed_segments


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision.

    **Images** are laid out as the model's ``pack_image_features`` does: the base crop's ``side x side`` grid, then
    the high-res crops' grid, unpadded to the image's aspect ratio and, when it holds more than ``N`` crops' worth
    of patches (``vision_aspect_ratio="anyres_max_N"``), bilinearly shrunk to about that area, with a newline token
    after each row. A sample with several images encodes each as its base crop alone (base grid + one newline).
    The budget counts every token, newlines included (as LLaVA-NeXT).

    **Videos**: every frame goes through the tower and the projector, then ``apply_pooling`` shrinks each frame's
    grid bilinearly to ``ceil(side / 2)`` squared (27x27 -> 14x14 at 384 px) and one newline token closes the
    video: ``F`` frame segments and a trailing newline segment, all in one video item, 1-D positions
    (``positions="renumber"`` is the default, as the LLaVA code). Frame times are not in the inputs (``time``
    stays None). Video items carry no encoder fields (the pooling mixes patches after the projector; no
    video-capable method reads them).

    Lazy fields of images (SigLIP has no [CLS], so, as for Qwen2-VL, the substitute is received attention):
      * ``token_attention`` ``(heads, N)``: mean attention each patch receives from every query of its crop at the
        feature layer (``vision_feature_layer``), recomputed from that layer's hooked input so the tower keeps
        its attention implementation;
      * ``vision_keys`` ``(N, d_h)``: that layer's keys, averaged over heads.
    Both are per-crop tables laid out through the model's own ``pack_image_features`` exactly like the
    embeddings, so a shrunk high-res grid gets the bilinear blend of its patches' values and newline tokens get
    zeros (``segments`` tells methods where they are). ``vision_features`` is not provided: the projector is not
    linear, so a shrunk token is not the projection of blended features, and merging methods merge the LLM-input
    embeddings instead (as on Qwen2-VL).
    """

    family = "llava-onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    modalities = ("image", "video")
    layer_rows = False  # SigLIP has no [CLS]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.aspect_ratio = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
        self.pooled = math.ceil(self.side / 2)

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        crops = upstream.onevision_crops(self.config, image_sizes, kwargs.get("batch_num_images"))
        features = upstream.image_features(output)
        ones = torch.ones(sum(crops), self.side * self.side, 1, device=features[0].device)
        valid = [packed[:, 0] > 0.5 for packed in self._pack(ones, image_sizes, crops)]
        tables = self._lazy_tables(image_sizes, crops)
        images = []
        for i, embeds in enumerate(features):
            lazy = {name: (lambda table=table, i=i: table()[i]) for name, table in tables.items()}
            images.append(MediaItem(embeds, packed_segments(valid[i], self.side), family=self.family, lazy=lazy))
        return images

    def build_videos(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        per_frame = self.pooled * self.pooled
        pixels = args[0] if args else kwargs.get("pixel_values_videos", kwargs.get("pixel_values"))
        frames = int(pixels.shape[1])  # (videos, frames, 3, H, W)
        videos = []
        for embeds in upstream.onevision_videos(self.inner, output, frames, per_frame):
            segments = [Segment(t * per_frame, self.pooled, self.pooled, frame=t) for t in range(frames)]
            segments.append(Segment(frames * per_frame, 1, 0, newline=True))
            videos.append(MediaItem(embeds, segments, modality="video", family=self.family))
        return videos

    def _pack(self, table: torch.Tensor, image_sizes: Any, crops: list[int]) -> list[torch.Tensor]:
        """Per image, the ``(tokens, C)`` layout of a per-crop ``(crops, side * side, C)`` table, newlines zero."""
        newline = torch.zeros(table.shape[-1], dtype=table.dtype, device=table.device)
        return upstream.onevision_pack(self.inner, list(torch.split(table, crops)), image_sizes, newline,
                                       self.aspect_ratio)

    def _lazy_tables(self, image_sizes: Any, crops: list[int]) -> dict[str, Callable[[], list[torch.Tensor]]]:
        if self.clip is None:
            return {}
        store = self.captured
        first = int(self.strategy == "default")  # the patch (or [CLS]) the "default" strategy drops

        def received() -> tuple[torch.Tensor, torch.Tensor]:
            return once(store, "received", lambda: self.clip.received_attention_and_keys(store))

        def packed(name: str, make: Callable[[], torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
            return lambda: once(store, name, lambda: self._pack(make(), image_sizes, crops))

        attention = packed("packed_attention", lambda: received()[0][:, :, first:].transpose(1, 2))
        return {
            "token_attention": lambda: [values.T for values in attention()],
            "vision_keys": packed("packed_keys", lambda: received()[1][:, first:]),
        }
