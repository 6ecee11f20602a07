"""Qwen2-VL and Qwen2.5-VL: ViT without [CLS], 2x2 patch merger, M-RoPE (t, h, w) positions in the LLM."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import Segment, MediaItem
from mmprune.models.base import ModelAdapter, capture_input, once, received_in_spans


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL.

    Each image is one grid of merged tokens ``(h / m, w / m)`` (``m`` = spatial merge size), in raster order as
    the merger returns them. A video (``get_video_features``, ``video_token_id``) is ``t`` such grids, one per
    temporal patch of ``temporal_patch_size`` frames, in ``(t, h, w)`` raster order; on Qwen2.5-VL grid ``k``
    starts at ``k * second_per_grid_ts`` seconds. Kept tokens keep their original M-RoPE ids (the default, as EVS
    and the Qwen ports of the references do); ``positions="renumber"`` is not defined for 3-D positions and is
    refused.

    Lazy fields (the tower has no [CLS]):
      * ``token_attention`` ``(heads, N)``: mean attention each merged token receives from all patches of its
        image (of its temporal grid, for a video: the tower never attends across grids) at the last vision block, ``softmax(q k^T / sqrt(d))`` with the block's own RoPE and its own attention span
        (``cu_seqlens``), averaged over the ``m x m`` patches of the merge unit; recomputed from the block input so
        the tower keeps its attention implementation;
      * ``vision_keys`` ``(N, d_h)``: that block's post-RoPE keys, averaged over heads and the merge unit.
    """

    family = "qwen2-vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    modalities = ("image", "video")
    default_positions = "original"
    supports_renumber = False
    seconds_argument = "second_per_grid_ts"  # the forward argument with each video's seconds per temporal grid

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = self.inner.visual
        self.vision = upstream.qwen_vision(self.visual)
        self.merge = self.vision.merge
        self.block = self.vision.block
        self.windowed = self.vision.windowed  # Qwen2.5-VL reorders patches by window

    def install_capture(self, extra: tuple[str, ...] = ()) -> list:
        return [self.vision.attention.register_forward_pre_hook(capture_input(self, "block_in"), with_kwargs=True)]

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        return self._build("image", output, kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None))

    def build_videos(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        return self._build("video", output, kwargs.get("video_grid_thw", args[1] if len(args) > 1 else None))

    def annotate(self, items: list[MediaItem], arguments: dict) -> None:
        """Videos: grid k starts at ``k * <seconds per grid>`` seconds, read from the forward argument
        ``seconds_argument`` (Qwen2-VL gives no time)."""
        seconds = arguments.get(self.seconds_argument)
        videos = [item for item in items if item.modality == "video"]
        if seconds is None or not videos:
            return
        for video, step in zip(videos, seconds.tolist() if hasattr(seconds, "tolist") else seconds):
            video.segments = [replace(s, time=s.frame * float(step)) for s in video.segments]

    def _build(self, modality: str, output: Any, grid_thw: torch.Tensor | None) -> list[MediaItem]:
        if grid_thw is None:
            raise ValueError(f"Qwen2-VL {modality} features need {modality}_grid_thw")
        store = self.captured
        items = []
        for i, embeds in enumerate(upstream.image_features(output)):
            t, h, w = (int(v) for v in grid_thw[i])
            rows, cols = h // self.merge, w // self.merge
            if modality == "image":
                if t != 1:
                    raise ValueError(f"image {i} has {t} temporal patches; only still images (t=1) are images")
                segments = [Segment(start=0, rows=rows, cols=cols)]
            else:  # one grid per temporal step, in the (t, h, w) raster order of the merger's output
                segments = [Segment(start=k * rows * cols, rows=rows, cols=cols, frame=k) for k in range(t)]

            def lazy_scores(i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
                return once(store, "scores", lambda: self._received_attention(store, grid_thw))[i]

            lazy = {
                "token_attention": lambda f=lazy_scores: f()[0],
                "vision_keys": lambda f=lazy_scores: f()[1],
            }
            items.append(MediaItem(embeds, segments, modality=modality, family=self.family, lazy=lazy))
        return items

    def _received_attention(self, store: dict, grid_thw: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: ((heads, N) received attention, (N, d_h) keys), merged tokens in raster order."""
        hidden, kwargs = store["block_in"]
        attn = self.vision.attention
        unit = self.merge * self.merge
        with torch.no_grad():
            seq = hidden.shape[0]
            q, k = self.vision.queries_keys(hidden)
            cos, sin = kwargs["position_embeddings"]
            q, k = self.vision.apply_rope(q, k, cos, sin)
            q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (heads, seq, d)
            received = received_in_spans(q, k, kwargs["cu_seqlens"].tolist(), attn.scaling)
            # patches are grouped by merge unit (m*m consecutive patches per merged token)
            per_unit = received.view(attn.num_heads, seq // unit, unit).mean(-1)
            keys_unit = k.mean(0).view(seq // unit, unit, -1).mean(1)
            order = self._raster_order(grid_thw, seq // unit, hidden.device)
            per_unit = per_unit[:, order]
            keys_unit = keys_unit[order]
        results, offset = [], 0
        for t, h, w in grid_thw.tolist():
            n = t * (h // self.merge) * (w // self.merge)
            results.append((per_unit[:, offset:offset + n], keys_unit[offset:offset + n]))
            offset += n
        return results

    def _raster_order(self, grid_thw: torch.Tensor, units: int, device: torch.device) -> torch.Tensor:
        """Index that maps merged-token raster order to the block's (possibly window-permuted) order."""
        if not self.windowed:
            return torch.arange(units, device=device)
        window_index = upstream.qwen_window_index(self.visual, grid_thw)
        # block order position p holds raster unit window_index[p]; we want, per raster unit, its block position
        return torch.argsort(window_index).to(device)
