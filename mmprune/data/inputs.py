"""Left-padded model inputs for a batch of chat requests (images, videos, text), for every supported family.

The CLI (one request) and the lmms-eval model (real batches) build their inputs here, so a prompt reaches the model
the same way whichever door it came through:

- a model whose processor could be built, with images only: the processor's own chat template and call;
- Qwen2-VL / Qwen2.5-VL without its processor (it needs torchvision) or with a video: the tokenizer's template,
  the PIL image processor, and :func:`mmprune.data.video.qwen_video_inputs` for the video (frames first sized
  within the video processor's per-frame pixel bounds, as it does), placeholders expanded to each image's and
  video's token count (what the processor does);
- LLaVA-OneVision / LLaVA-NeXT-Video videos: :func:`mmprune.data.video.llava_video_inputs` (video-only prompts).

Anything else (audio, images next to a LLaVA video, a video on an image-only family) is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mmprune import upstream
from mmprune.loading import MediaParts

LLAVA_VIDEO_FAMILIES = ("llava-onevision", "llava-next-video")
VIDEO_FAMILIES = "Qwen2-VL/Qwen2.5-VL and LLaVA-OneVision/LLaVA-NeXT-Video models"


@dataclass
class Request:
    """One sample: chat ``messages`` in the HF format whose media items are bare placeholders (``{"type": "image"}``,
    ``{"type": "video"}``), and the media in the order they appear (a video is its list of RGB frames)."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)

    @classmethod
    def of(cls, text: str, images=(), videos=()) -> Request:
        """One user turn: the images, then the videos, then the text."""
        content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
                   + [{"type": "text", "text": text}])
        return cls([{"role": "user", "content": content}], list(images), [list(v) for v in videos])

    @classmethod
    def from_chat(cls, messages: list[dict], fps: float = 2.0, max_frames: int | None = None) -> Request:
        """From HF chat messages with the media inline: ``{"type": "image", "image": PIL image or file}``,
        ``{"type": "video", "video": file, folder of frames or list of frames}`` (optional ``video_start`` /
        ``video_end`` in seconds keep the frames sampled in that span); videos are sampled at ``fps`` and capped at
        ``max_frames`` (see :func:`mmprune.data.video.read_frames`). Audio is refused."""
        from mmprune.data.video import as_frames, capped, read_frames

        images, videos, turns = [], [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            kept = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    kept.append({"type": "text", "text": part["text"]})
                elif kind == "image":
                    source = part.get("image", part.get("url"))
                    images.append(source.convert("RGB") if isinstance(source, Image.Image)
                                  else Image.open(Path(source)).convert("RGB"))
                    kept.append({"type": "image"})
                elif kind == "video":
                    source = part.get("video", part.get("url"))
                    frames = (read_frames(source, fps) if isinstance(source, (str, Path)) else as_frames(source))
                    start, end = part.get("video_start"), part.get("video_end")
                    if start is not None or end is not None:
                        span = [f for i, f in enumerate(frames) if (start is None or i / fps >= start)
                                and (end is None or i / fps <= end)]
                        if not span:
                            raise ValueError(f"video span {start}-{end} s holds no frame sampled at {fps} fps")
                        frames = span
                    videos.append(capped(frames, max_frames))
                    kept.append({"type": "video"})
                else:
                    raise ValueError(f"a {kind!r} item in a chat message: mmprune builds prompts from text, images "
                                     "and videos")
            turns.append({"role": message["role"], "content": kept})
        return cls(turns, images, videos)


def model_inputs(model, processor, requests: list[Request], fps: float = 2.0) -> dict[str, torch.Tensor]:
    """One left-padded batch (CPU tensors) for ``requests`` on ``model``; ``ValueError`` for what cannot be built."""
    from mmprune.models import adapter_for

    family = adapter_for(model).family
    name = type(model).__name__
    has_video = any(r.videos for r in requests)
    if has_video and family in LLAVA_VIDEO_FAMILIES:
        return llava_video_batch(model, processor, requests)
    if has_video or isinstance(processor, MediaParts):
        if has_video and family != "qwen2-vl":
            raise ValueError(f"video prompts are built for {VIDEO_FAMILIES}; {name} is not one")
        if family != "qwen2-vl":
            raise ValueError(f"the processor of {name} could not be built (it needs torchvision); without it "
                             "image prompts are built for Qwen2-VL/Qwen2.5-VL only")
        return qwen_batch(model, processor, requests, fps)
    return processor_batch(processor, requests)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def chat_text(processor, messages: list[dict], placeholder: str = "<image>") -> str:
    """The prompt text from the chat template (the processor's, else the tokenizer's), or LLaVA-1.5's plain format
    when the model has none."""
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    parts = [part for message in messages for part in message["content"]]
    media = "".join(placeholder for part in parts if part["type"] != "text")
    text = " ".join(part["text"] for part in parts if part["type"] == "text")
    return f"USER: {media}\n{text} ASSISTANT:"


def padded(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, padding_side="left", return_tensors="pt"))


def processor_batch(processor, requests: list[Request]) -> dict[str, torch.Tensor]:
    """Image prompts through the model's own processor (:func:`model_inputs` routes every video elsewhere)."""
    texts = [chat_text(processor, r.messages) for r in requests]
    images = [image for r in requests for image in r.images]
    return dict(processor(text=texts, images=images or None, padding=True, padding_side="left",
                          return_tensors="pt"))


def qwen_batch(model, processor, requests: list[Request], fps: float) -> dict[str, torch.Tensor]:
    """What Qwen2-VL's processor does, from its parts: each ``<|image_pad|>`` / ``<|video_pad|>`` placeholder
    expanded to its image's / video's merged-token count."""
    from mmprune.data.video import qwen_video_inputs

    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    config = model.config
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    merge = int(image_processor.merge_size) ** 2
    extra: dict = {}
    images = [image for r in requests for image in r.images]
    image_counts = iter(())
    if images:
        pixels = image_processor(images=images, return_tensors="pt")
        extra.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        image_counts = iter([int(g.prod()) // merge for g in pixels["image_grid_thw"]])
    bounds = upstream.video_pixel_bounds(processor)
    videos = [qwen_video_inputs(bounded(frames, bounds, patch_factor(image_processor)), image_processor, fps=fps)
              for r in requests for frames in r.videos]
    video_counts = iter([v.pop("video_tokens") for v in videos])
    if videos:
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            extra[key] = torch.cat([v[key] for v in videos])
        if not upstream.accepts(model.model.forward, "second_per_grid_ts"):
            extra.pop("second_per_grid_ts")  # Qwen2-VL spaces grids by one position, whatever the time
    texts = []
    for request in requests:
        text = chat_text(processor, request.messages)
        text = expand(text, image_token, [next(image_counts) for _ in request.images])
        texts.append(expand(text, video_token, [next(video_counts) for _ in request.videos]))
    inputs = padded(tokenizer, texts)
    inputs["mm_token_type_ids"] = upstream.mm_token_types(inputs["input_ids"], config.image_token_id,
                                                          config.video_token_id)
    return {**inputs, **extra}


def patch_factor(image_processor) -> int:
    return int(image_processor.patch_size) * int(image_processor.merge_size)


def bounded(frames: list[Image.Image], bounds: tuple[int, int] | None, factor: int) -> list[Image.Image]:
    """Frames resized as Qwen's video processor sizes them: the nearest multiple of ``factor`` whose pixel count is
    within the video processor's per-frame ``(min_pixels, max_pixels)`` (unchanged without bounds). The total-video
    budget newer video processors can add on top (``cap_pixels_per_frame``) is not applied: cap ``max_frames``."""
    if bounds is None:
        return frames
    width, height = frames[0].size
    new_height, new_width = upstream.qwen_smart_resize()(height, width, factor, *bounds)
    if (new_width, new_height) == (width, height):
        return frames
    return [f.resize((new_width, new_height), Image.BICUBIC) for f in frames]


def expand(text: str, token: str, counts: list[int]) -> str:
    """Each of the ``len(counts)`` occurrences of ``token`` repeated to its count."""
    parts = text.split(token)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the chat template wrote {len(parts) - 1} {token} placeholders for {len(counts)} media "
                         "items")
    return "".join(part + (token * counts[i] if i < len(counts) else "") for i, part in enumerate(parts))


def llava_video_batch(model, processor, requests: list[Request]) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision / LLaVA-NeXT-Video video prompts (their video processors need torchvision): one video per
    request, no images, the same frame count across the batch (the model stacks the clips)."""
    from mmprune.data.video import llava_video_inputs

    name = type(model).__name__
    if any(r.images for r in requests) or any(len(r.videos) != 1 for r in requests):
        raise ValueError(f"{name}: video prompts are built with one video and no image per prompt on "
                         "LLaVA-OneVision/LLaVA-NeXT-Video (images next to a video work through the model's "
                         "processor, which needs torchvision)")
    lengths = sorted({len(r.videos[0]) for r in requests})
    if len(lengths) > 1:
        raise ValueError(f"{name} stacks the videos of a batch: they need the same frame count, got "
                         f"{', '.join(map(str, lengths))} (cap them with max_frames, or use batch size 1)")
    tokenizer = tokenizer_of(processor)
    token = tokenizer.convert_ids_to_tokens(model.config.video_token_id)
    clips, texts = [], []
    for request in requests:
        video = llava_video_inputs(request.videos[0], model.config, processor.image_processor)
        texts.append(expand(chat_text(processor, request.messages, token), token, [video.pop("video_tokens")]))
        clips.append(video["pixel_values_videos"])
    return {**padded(tokenizer, texts), "pixel_values_videos": torch.cat(clips)}
