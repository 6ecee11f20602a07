"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, and the MoE variant ``Qwen3_5MoeForConditionalGeneration``): the
Qwen3-VL vision tower without DeepStack, and a hybrid decoder whose layers are mostly linear attention (Gated
DeltaNet) with full attention every fourth layer."""

from __future__ import annotations

from mmprune.models.qwen2_vl import Qwen2VLAdapter


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5 and Qwen3.5-MoE.

    Images and videos as Qwen3-VL: an image is one grid of merged tokens ``(h / m, w / m)`` (``m`` = spatial merge
    size, 2 on the released checkpoints) in raster order as the merger returns them; a video is ``t`` such grids,
    one per temporal patch, each in its own vision span after a timestamp written as text (``time`` stays None). The
    tower has no [CLS] and no windows: ``token_attention`` is the mean attention each merged token receives from the
    patches of its image (of its grid, for a video) at the last vision block, averaged over the ``m x m`` patches of
    the merge unit, recomputed from that block's input with its own RoPE (see :class:`Qwen2VLAdapter`). Unlike
    Qwen3-VL, nothing is added to the decoder besides the merger's output (no DeepStack), so no decoder layer is
    closed to in-LLM stages on that account.

    Positions: interleaved M-RoPE ``(t, h, w)`` over the first quarter of each head's dimensions
    (``partial_rotary_factor``); kept tokens keep their original ids (the default, as for the other Qwen families);
    ``positions="renumber"`` is refused.

    Decoder: ``config.text_config.layer_types`` holds ``linear_attention`` (Gated DeltaNet: a causal convolution and
    a recurrent state per layer in the cache, no keys or values) and ``full_attention`` (gated softmax attention, a KV
    cache). A pre-LLM compaction shortens every layer's input alike: the full-attention layers cache the text and the
    kept tokens, and each linear layer's conv and recurrent states are those of the compacted sequence. Padded
    positions of a left-padded batch reach the linear layers zeroed (their 2-D mask), which leaves both states
    untouched, so a padded sample gives what it gives alone. An in-LLM stage gives the linear layers after it the
    compacted 2-D mask and leaves those before it with the states of the whole prompt (each state holds the tokens
    that entered its layer, as each KV cache does). Methods that read decoder attention can read only the
    full-attention layers; reading a linear one is refused with the list of attention layers (README: which layer
    each method reads on the released depths).
    """

    family = "qwen3.5"
    model_classes = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
