"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images, and videos whose frames are
pooled before the projector."""

from __future__ import annotations

from typing import Any

from mmprune import upstream
from mmprune.media import MediaItem, Segment
from mmprune.models.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video. Images are LLaVA-NeXT's (anyres crops with newline tokens). A video's frames each go
    through the CLIP tower, the ``vision_resampler`` pools each frame's ``side x side`` patch grid by
    ``spatial_pool_stride`` (average, max or conv) and the projector maps the pooled tokens: ``F`` frames of
    ``(side / s) x (side / s)`` tokens, no newline, 1-D positions (so ``positions="renumber"`` is defined, and is
    the LLaVA-code default). Frame times are not in the inputs (``time`` stays None). Video items carry no
    encoder-attention fields: the pooling mixes 2x2 patches before the projector, and no video-capable method
    reads them.
    """

    family = "llava-next-video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    modalities = ("image", "video")

    def build_videos(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
        frames = int(pixels.shape[1])
        side = self.side // int(self.config.spatial_pool_stride)
        videos = []
        for embeds in upstream.image_features(output):
            segments = [Segment(start=t * side * side, rows=side, cols=side, frame=t) for t in range(frames)]
            videos.append(MediaItem(embeds, segments, modality="video", family=self.family))
        return videos
