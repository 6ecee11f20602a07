"""Qwen2.5-Omni thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): Qwen2.5-VL's vision tower, a Whisper-style
audio tower, and TMRoPE positions over interleaved audio and video."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, Segment
from mmprune.models.base import capture_input, once, received_in_spans
from mmprune.models.qwen2_vl import Qwen2VLAdapter
from mmprune.models.qwen3_vl import DeepStackMixin

# The Whisper front end gives 100 mel frames per second; the audio tower's stride-2 convolution and its 2x average
# pooling leave one token per 4 frames.
AUDIO_TOKEN_SECONDS = 0.04


class Qwen2_5OmniAdapter(Qwen2VLAdapter):
    """The Qwen2.5-Omni thinker (text output).

    Images and videos are Qwen2.5-VL's (the same windowed tower, 2x2 merge, lazy received attention); grid ``k`` of
    a video starts at ``k * video_second_per_grid`` seconds. An **audio clip** is one item of ``N`` tokens in time
    order (one ``1 x N`` segment), 25 per second (``token_seconds`` 0.04); ``get_audio_features`` returns every clip's
    tokens flat and the adapter splits them by each clip's mel length. With ``use_audio_in_video`` the processor
    interleaves a video's grids and its audio in 2-second chunks; items are placed by their own placeholder tokens,
    so each keeps its order and kept tokens keep their slots and TMRoPE ids (``positions="original"``, the only
    policy: the ids are 3-D). An audio clip's ``token_attention`` ``(heads, N)`` is the attention each token receives
    at the audio tower's last layer (mean over the queries of its attention chunk, recomputed from the hooked layer
    input; the two positions the tower pools into a token averaged), the counterpart of the vision field.

    Speech output is refused while a method is attached: the talker reads the thinker's prompt hidden states
    (``generate(return_audio=True)`` asks the thinker for them), which pruning shortens. Attach to ``model.thinker``
    of a ``Qwen2_5OmniForConditionalGeneration`` and generate text (``return_audio=False``), or call the thinker.
    Supported from transformers 5.21 (earlier releases lay the thinker out differently; refused at attach).
    """

    family = "qwen2.5-omni"
    model_classes = ("Qwen2_5OmniThinkerForConditionalGeneration",)
    modalities = ("image", "video", "audio")
    seconds_argument = "video_second_per_grid"
    audio_token_seconds = AUDIO_TOKEN_SECONDS
    audio_pool = 2  # encoder positions averaged into one audio token

    def __init__(self, model: nn.Module) -> None:
        upstream.check_omni_layout(model)
        super().__init__(model)

    def install_capture(self, extra: tuple[str, ...] = ()) -> list:
        attention = upstream.omni_audio_attention(self.inner.audio_tower)
        return [*super().install_capture(extra),
                attention.register_forward_pre_hook(capture_input(self, "audio_in"), with_kwargs=True)]

    def build_items(self, modality: str, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        if modality != "audio":
            return super().build_items(modality, output, args, kwargs)
        store = self.captured
        positions, _ = upstream.audio_positions_and_tokens(self.inner.audio_tower, upstream.audio_lengths(args, kwargs))
        items = []
        for i, embeds in enumerate(upstream.audio_items(self.inner, output, args, kwargs)):
            def lazy(i: int = i) -> torch.Tensor:
                return once(store, "audio_attention", lambda: self._audio_attention(store, positions))[i]

            items.append(MediaItem(embeds, [Segment(0, 1, embeds.shape[0])], modality="audio", family=self.family,
                                   token_seconds=self.audio_token_seconds, lazy={"token_attention": lazy}))
        return items

    def _audio_attention(self, store: dict, positions: list[int]) -> list[torch.Tensor]:
        """Per clip, ``(heads, N)``: the mean attention each position receives from every query of its attention
        chunk at the tower's last layer (the chunks the model attends within), averaged over the positions the tower
        pools into each token (2 on Qwen2.5-Omni; Qwen3-Omni does not pool)."""
        hidden, kwargs = store["audio_in"]
        attn = upstream.omni_audio_attention(self.inner.audio_tower)
        seq = hidden.shape[0]
        with torch.no_grad():
            q = attn.q_proj(hidden).view(seq, attn.num_heads, -1).transpose(0, 1)
            k = attn.k_proj(hidden).view(seq, attn.num_heads, -1).transpose(0, 1)
            received = received_in_spans(q, k, kwargs["cu_seqlens"].tolist(), attn.scaling)
        out = []
        for per_clip in torch.split(received, positions, dim=1):
            pool = self.audio_pool
            tokens = per_clip.shape[1] // pool
            out.append(per_clip[:, :pool * tokens].reshape(per_clip.shape[0], tokens, pool).mean(-1))
        return out

    def refused_generation(self, setting: Callable[[str], Any]) -> list[str]:
        if setting("output_hidden_states"):
            return ["output_hidden_states=True (speech output: the talker reads the thinker's prompt hidden states, "
                    "which pruning shortens; generate text with return_audio=False)"]
        return []


class Qwen3OmniAdapter(DeepStackMixin, Qwen2_5OmniAdapter):
    """The Qwen3-Omni thinker (``Qwen3OmniMoeThinkerForConditionalGeneration``, MoE decoder; text output).

    As Qwen2.5-Omni, with: a vision tower without windows whose intermediate blocks feed **DeepStack** (per-layer
    visual features added at the visual positions after each of the first ``len(deepstack_visual_indexes)``
    decoder layers); an audio tower downsampling 8x with no pooling (13 tokens per 100 mel frames); audio
    interleaved with a video token by token in time order. Pre-LLM pruning keeps each surviving visual token's
    DeepStack rows (a merged token, its slot token's rows); an in-LLM stage inside the DeepStack layers is refused.
    The attention rows in-LLM methods recompute apply Qwen3's per-head ``q_norm``/``k_norm``.
    """

    family = "qwen3-omni"
    model_classes = ("Qwen3OmniMoeThinkerForConditionalGeneration",)
    audio_token_seconds = 1 / 13
    audio_pool = 1

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.deepstack_layers = self.deepstack_count()
