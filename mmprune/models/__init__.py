"""How each model family exposes its image tokens: one adapter per family."""

from __future__ import annotations

from torch import nn

from mmprune.models.base import ModelAdapter
from mmprune.models.gemma3 import Gemma3Adapter
from mmprune.models.idefics3 import Idefics3Adapter
from mmprune.models.internvl import InternVLAdapter
from mmprune.models.llava import LlavaAdapter
from mmprune.models.llava_next import LlavaNextAdapter
from mmprune.models.llava_next_video import LlavaNextVideoAdapter
from mmprune.models.llava_onevision import LlavaOnevisionAdapter
from mmprune.models.qwen2_5_omni import Qwen2_5OmniAdapter, Qwen3OmniAdapter
from mmprune.models.qwen2_vl import Qwen2VLAdapter
from mmprune.models.qwen3_vl import Qwen3VLAdapter
from mmprune.models.qwen3_5 import Qwen3_5Adapter

ADAPTERS: list[type[ModelAdapter]] = [LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter,
                                     Qwen2VLAdapter, Qwen2_5OmniAdapter,
                                     Qwen3OmniAdapter, Qwen3VLAdapter, InternVLAdapter, Qwen3_5Adapter,
                                     Gemma3Adapter, Idefics3Adapter]


def supported_families() -> list[str]:
    return [f"{a.family} ({', '.join(a.model_classes)})" for a in ADAPTERS]


def adapter_for(model: nn.Module) -> ModelAdapter:
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError(
            "this model was compiled with torch.compile: attach to the uncompiled model (model._orig_mod, or before "
            "compiling); pruning changes sequence lengths inside the forward, which a compiled graph does not follow")
    if type(model).__name__ == "Qwen2_5OmniForConditionalGeneration":
        raise ValueError("Qwen2_5OmniForConditionalGeneration: attach to its .thinker (mmprune prunes the thinker's "
                         "prompt; the talker, which speaks, reads the unpruned prompt's hidden states): "
                         "pruner.attach(model.thinker), then generate text (return_audio=False)")
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise ValueError(
        f"{type(model).__name__} is not a supported model; supported families: {'; '.join(supported_families())}"
    )
