"""Any supported checkpoint and its processor, through the stock HF auto classes (the CLI and lmms-eval load here).

Processors with a video slot (Qwen, LLaVA-OneVision, ...) cannot be constructed without torchvision; where that
fails, :class:`MediaParts` holds the tokenizer and the image processor instead, and :mod:`mmprune.data.inputs`
builds those families' inputs from the parts.
"""

from __future__ import annotations

from pathlib import Path

from mmprune import upstream

DTYPES = ("auto", "float32", "bfloat16", "float16")


def looks_like_path(model_id: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper) is a folder."""
    return (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id
            or Path(model_id).exists())


def resolve_device(device: str | None) -> str:
    """``None``: cuda when available, else cpu; otherwise the name, checked (``ValueError`` naming what is wrong)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"{device!r} is not a torch device: expected e.g. cpu, cuda, cuda:1, mps") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{device}: no CUDA device is available on this machine; use cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    """``auto``: bfloat16 on a GPU, float32 on the CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def load(model_id: str, device: str = "cpu", dtype: str = "auto", attn_implementation: str | None = None,
         trust_remote_code: bool = False):
    """``(model, processor)`` from a local folder or hub id, in eval mode on ``device``; ``ValueError`` (one line,
    starting with the model's name) when it cannot be loaded."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(model_id).expanduser()
    local = looks_like_path(model_id)
    if local:
        if not path.exists():
            raise ValueError(f"{model_id!r}: no such folder")
        if not path.is_dir():
            raise ValueError(f"{model_id!r} is a file: expected a model folder (config.json, weights, processor "
                             "files) or a hub id")
    hf_logging.disable_progress_bar()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if trust_remote_code:
        extra["trust_remote_code"] = True
    source = str(path) if local else model_id
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=resolve_dtype(dtype, device), **extra)
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        try:
            processor = AutoProcessor.from_pretrained(source, **remote)
        except (ImportError, AttributeError, ValueError):
            # processors with a video slot (Qwen, LLaVA-OneVision, ...) cannot be built without torchvision (an
            # ImportError, AttributeError or ValueError depending on the class and release); their parts can
            processor = MediaParts(AutoTokenizer.from_pretrained(source, **remote),
                                   upstream.load_image_processor(source), upstream.saved_video_size(source))
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"{model_id!r} could not be loaded: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), processor


class MediaParts:
    """A tokenizer and an image processor standing in for a processor that cannot be built here, with the saved
    video processor's ``size`` (per-frame pixel bounds) when the checkpoint has one."""

    def __init__(self, tokenizer, image_processor, video_size: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.video_size = video_size

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)
