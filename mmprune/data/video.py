"""Video inputs built from frames, without torchvision: Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video.

transformers' video processors need torchvision (and a processor with a video slot cannot even be constructed
without it). :func:`qwen_video_inputs` does what ``Qwen2VLVideoProcessor`` does for frames already sampled:
resize to a multiple of ``patch_size * merge_size``, rescale and normalise with the image processor's mean and std,
pad the frame count to a multiple of ``temporal_patch_size`` by repeating the last frame, and cut the clip into
``temporal_patch_size x patch_size x patch_size`` patches in the order the model's patch embedding expects (the
order of transformers' own ``patchify``, checked against the PIL image processor in the tests).

    inputs = qwen_video_inputs(frames, processor.image_processor, fps=2.0)
    text = f"<|vision_start|>{'<|video_pad|>' * inputs.pop('video_tokens')}<|vision_end|>What happens?"

:func:`llava_video_inputs` does what the LLaVA-OneVision and LLaVA-NeXT-Video video processors do (resize, for
NeXT-Video a centre crop, rescale, normalise) and counts the ``<video>`` placeholders the model fills.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def check_fps(fps: float) -> None:
    if not fps > 0:
        raise ValueError(f"fps={fps!r}: expected a positive number of frames per second")


def as_frames(frames: Sequence | np.ndarray) -> list[Image.Image]:
    """RGB PIL frames from PIL images or a ``(T, H, W, 3)`` uint8 array."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames array of shape {frames.shape} and dtype {frames.dtype}: expected (T, H, W, 3) "
                             "uint8")
        frames = [Image.fromarray(f) for f in frames]
    frames = [f.convert("RGB") if isinstance(f, Image.Image) else None for f in frames]
    if not frames or any(f is None for f in frames):
        raise ValueError("frames: expected a non-empty list of PIL images or a (T, H, W, 3) uint8 array")
    return frames


def qwen_video_inputs(frames, image_processor, fps: float = 2.0) -> dict:
    """``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` (Qwen2.5-VL reads it; Qwen2-VL ignores
    it) and ``video_tokens`` (how many ``<|video_pad|>`` placeholders the prompt needs) for one video.

    ``image_processor`` supplies ``patch_size``, ``temporal_patch_size``, ``merge_size``, ``image_mean`` and
    ``image_std`` (the model's ``Qwen2VLImageProcessorPil`` has them). Frames are resized to the first frame's size
    rounded to the nearest multiple of ``patch_size * merge_size`` (at least one), without Qwen's pixel-count
    bounds: sample and size the frames as the model expects before calling this.
    """
    check_fps(fps)
    frames = as_frames(frames)
    patch, temporal, merge = (int(image_processor.patch_size), int(image_processor.temporal_patch_size),
                              int(image_processor.merge_size))
    factor = patch * merge
    width, height = frames[0].size
    size = (max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor))
    pixels = np.stack([np.asarray(f.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0 for f in frames])
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    clip = torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())  # (T, C, H, W)
    if clip.shape[0] % temporal:
        clip = torch.cat([clip, clip[-1:].expand(temporal - clip.shape[0] % temporal, -1, -1, -1)])
    return {**patchify(clip, patch, temporal, merge), "second_per_grid_ts": torch.tensor([temporal / fps])}


def patchify(clip: torch.Tensor, patch: int, temporal: int, merge: int) -> dict:
    """``(T, C, H, W)`` normalised frames (``T`` a multiple of ``temporal``) -> the model's flattened patches, in
    ``(t, h / merge, w / merge, merge, merge)`` order, each patch ``(C, temporal, patch, patch)``."""
    frames, channels, height, width = clip.shape
    grid_t, grid_h, grid_w = frames // temporal, height // patch, width // patch
    x = clip.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = x.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return {"pixel_values_videos": flat, "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]]),
            "video_tokens": grid_t * grid_h * grid_w // (merge * merge)}


def llava_video_inputs(frames, config: Any, image_processor: Any) -> dict:
    """``pixel_values_videos`` ``(1, T, 3, S, S)`` and ``video_tokens`` (how many ``<video>`` placeholders the prompt
    needs) for one video on LLaVA-OneVision or LLaVA-NeXT-Video (``config`` is the model's).

    ``S`` is the vision tower's ``image_size``. LLaVA-OneVision's video processor resizes each frame to ``S x S``
    (bicubic); its model pools each frame's ``side x side`` patches to ``ceil(side / 2)`` squared after the projector
    and closes the video with one newline token. LLaVA-NeXT-Video's resizes the shortest edge to ``S`` and crops the
    centre ``S x S``; its model pools by ``spatial_pool_stride`` before the projector, no newline. Frames are
    rescaled to [0, 1] and normalised with ``image_processor``'s ``image_mean`` and ``image_std`` (the checkpoint's
    values for its tower).
    """
    frames = as_frames(frames)
    size = int(config.vision_config.image_size)
    side = size // int(config.vision_config.patch_size)
    if config.model_type == "llava_onevision":
        frames = [f.resize((size, size), Image.BICUBIC) for f in frames]
        tokens = len(frames) * math.ceil(side / 2) ** 2 + 1
    elif config.model_type == "llava_next_video":
        frames = [centre_crop(shortest_edge(f, size), size) for f in frames]
        tokens = len(frames) * (side // int(config.spatial_pool_stride)) ** 2
    else:
        raise ValueError(f"llava_video_inputs: {config.model_type!r} is not llava_onevision or llava_next_video")
    pixels = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in frames])
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    clip = torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())
    return {"pixel_values_videos": clip.unsqueeze(0), "video_tokens": tokens}


def shortest_edge(frame: Image.Image, size: int) -> Image.Image:
    width, height = frame.size
    scale = size / min(width, height)
    return frame.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)


def centre_crop(frame: Image.Image, size: int) -> Image.Image:
    width, height = frame.size
    left, top = (width - size) // 2, (height - size) // 2
    return frame.crop((left, top, left + size, top + size))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def read_frames(path, fps: float = 2.0, max_frames: int | None = None) -> list[Image.Image]:
    """Frames of a video sampled at ``fps``: a folder of image files (taken in name order as already sampled at
    ``fps``) or a video file decoded with PyAV (``pip install av``), keeping the first frame at or after each
    ``1 / fps`` step of its timestamps. ``max_frames`` caps the count (evenly spaced over the clip)."""
    from pathlib import Path

    path = Path(path)
    check_fps(fps)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{str(path)!r} holds no image frames ({', '.join(IMAGE_SUFFIXES)})")
        frames = [Image.open(p).convert("RGB") for p in files]
    elif path.is_file():
        frames = decode(path, fps)
    else:
        raise ValueError(f"{str(path)!r}: no such video file or folder of frames")
    return capped(frames, max_frames)


def capped(frames: list, max_frames: int | None) -> list:
    """At most ``max_frames`` of ``frames``, evenly spaced over the clip (first and last kept)."""
    if max_frames is not None and len(frames) > max_frames:
        frames = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, max_frames).round()]
    return frames


def decode(path, fps: float) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise ValueError(f"decoding {str(path)!r} needs PyAV (pip install av); or pass a folder of frames") from None
    frames, next_time = [], 0.0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                seconds = float(frame.pts * stream.time_base) if frame.pts is not None else next_time
                if seconds + 1e-6 >= next_time:
                    frames.append(frame.to_image().convert("RGB"))
                    next_time += 1.0 / fps
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable video: {exc}") from None
    if not frames:
        raise ValueError(f"{str(path)!r} holds no video frames")
    return frames

