"""An analytical FLOPs model of a VLM's prefill and decode steps, with the actual per-layer token counts.

Convention: **FLOPs = 2 x multiply-accumulates** of the matrix products (a ``(n, a) @ (a, b)`` product costs
``2 n a b``); softmax, norms, activations, RoPE and residual additions are not counted (they are O(n d), not
O(n d^2)). Per decoder layer with ``n`` query tokens attending to ``c`` keys (``c = n`` at prefill, counted as the
full ``n x n`` square as FastV and PyramidDrop do; the cache length at decode):

* projections: ``2 n d (d + 2 d_kv + d)`` (Q, K, V with GQA ``d_kv = kv_heads * head_dim``, O);
* attention: ``2 n c d`` (``Q K^T``) + ``2 n c d`` (``A V``);
* FFN: ``2 n d m x 3`` for SwiGLU (gate, up, down; LLaMA, Qwen2), ``x 2`` for a plain MLP (CLIP).

The vision tower is counted the same way (CLIP: ``1 + patches`` tokens per crop, a plain GELU MLP, the patch
embedding as a ``(patches, 3 p^2) @ (3 p^2, d)`` product), plus the projector, plus the LM head on the tokens whose
logits are computed (the last one at prefill under ``generate``). Qwen2.5-VL's windowed vision attention is counted
as full attention (an upper bound for the tower). A method that prunes inside the tower (FlowCut) shortens the
encoder's own sequence: its stats give, per image, the tokens entering each encoder layer
(``encoder_tokens_per_layer``, [CLS] included), each such crop's layers are counted at those lengths (the patch
embedding still runs on every patch), and the projector maps only the tokens that reach the feature layer; every
other method leaves the tower as it is. Qwen2.5-Omni's audio tower
(:func:`audio_flops`) counts its two convolutions on the real mel frames (not the chunk padding), its encoder layers
within their attention chunks, and its projection.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """The sizes the FLOPs model reads from a model config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn_matrices: int = 3  # SwiGLU
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0  # layers that run (up to the feature layer's output, as the model computes them all)
    vision_tokens: int = 0  # tokens per crop inside the tower (CLS included)
    vision_cls: int = 0  # 1 for CLIP's [CLS] (a token of the tower that is no patch); 0 for SigLIP and Qwen
    patch_dim: int = 0  # 3 * patch^2 (* temporal patch for Qwen)
    projector: tuple[tuple[int, int], ...] = ()  # (in, out) of each projector matmul, per visual token
    vision_ffn_matrices: int = 2  # plain MLP (CLIP, Qwen2-VL); 3 for Qwen2.5-VL's gated MLP
    audio_mel_bins: int = 0  # Qwen2.5-Omni's audio tower (0: the model has none)
    audio_hidden: int = 0
    audio_intermediate: int = 0
    audio_layers: int = 0
    audio_window: int = 0  # mel frames per attention chunk (2 * n_window)
    audio_out: int = 0

    @classmethod
    def from_config(cls, config) -> Geometry:
        text = config.text_config
        if getattr(text, "num_experts", None) or hasattr(getattr(config, "audio_config", None),
                                                          "downsample_hidden_size") \
                or "linear_attention" in (getattr(text, "layer_types", None) or ()):
            # counting these as dense layers or as Qwen2.5-Omni's audio tower would print wrong numbers
            raise ValueError(f"the FLOPs model does not cover {type(config).__name__} yet (a mixture-of-experts "
                             "decoder, Qwen3-Omni's audio tower, Qwen3.5's linear-attention layers)")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        vision = config.vision_config
        common = dict(hidden=text.hidden_size, intermediate=text.intermediate_size,
                      layers=text.num_hidden_layers, heads=text.num_attention_heads,
                      kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                      head_dim=head_dim, vocab=text.vocab_size)
        if hasattr(vision, "image_size") and hasattr(vision, "num_hidden_layers"):  # CLIP / SigLIP (LLaVA family)
            patches = (vision.image_size // vision.patch_size) ** 2
            with_cls = int("siglip" not in vision.model_type)  # SigLIP (LLaVA-OneVision) has no [CLS]
            return cls(**common, vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
                       vision_layers=vision.num_hidden_layers, vision_tokens=patches + with_cls, vision_cls=with_cls,
                       patch_dim=3 * vision.patch_size**2,
                       projector=((vision.hidden_size, text.hidden_size), (text.hidden_size, text.hidden_size)))
        # Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni: tokens per image vary; vision_tokens is set per call
        audio = getattr(config, "audio_config", None)
        if audio is not None:
            common.update(audio_mel_bins=audio.num_mel_bins, audio_hidden=audio.d_model,
                          audio_intermediate=audio.encoder_ffn_dim, audio_layers=audio.encoder_layers,
                          audio_window=2 * audio.n_window, audio_out=audio.output_dim)
        hidden = getattr(vision, "hidden_size", None) or vision.embed_dim
        embed = getattr(vision, "embed_dim", hidden)
        mlp = getattr(vision, "intermediate_size", None) or int(embed * getattr(vision, "mlp_ratio", 4))
        merge = vision.spatial_merge_size**2
        gated = hasattr(vision, "fullatt_block_indexes")  # Qwen2.5-VL: SwiGLU blocks
        return cls(**common, vision_hidden=embed, vision_intermediate=mlp, vision_layers=vision.depth,
                   vision_ffn_matrices=3 if gated else 2,
                   patch_dim=(getattr(vision, "in_channels", None) or vision.in_chans) * vision.temporal_patch_size
                   * vision.patch_size**2,
                   projector=((embed * merge, embed * merge), (embed * merge, getattr(vision, "out_hidden_size",
                                                                                     text.hidden_size))))


def layer_flops(n: int, context: int, hidden: int, kv_dim: int, intermediate: int, ffn_matrices: int) -> int:
    """One transformer layer: ``n`` query tokens, ``context`` keys (see the module docstring)."""
    projections = 2 * n * hidden * (2 * hidden + 2 * kv_dim)
    attention = 4 * n * context * hidden
    ffn = 2 * n * hidden * intermediate * ffn_matrices
    return projections + attention + ffn


def vision_flops(g: Geometry, crops: int, tokens_per_crop: int | None = None, visual_tokens: int = 0,
                 encoder_tokens: list[list[int]] | None = None) -> int:
    """The vision tower over ``crops`` crops of ``tokens_per_crop`` tokens, and the projector over
    ``visual_tokens`` tokens (pre-LLM pruning does not change it: the encoder runs on every patch).
    ``encoder_tokens``: for crops pruned inside the tower (FlowCut), the tokens entering each encoder layer, one
    list per such crop; the other crops run whole."""
    n = tokens_per_crop if tokens_per_crop is not None else g.vision_tokens
    patches = n - g.vision_cls
    shortened = list(encoder_tokens or [])
    if len(shortened) > crops:
        raise ValueError(f"encoder_tokens describes {len(shortened)} crops of {crops}")
    if any(len(counts) != g.vision_layers for counts in shortened):
        raise ValueError(f"encoder_tokens needs one count per encoder layer ({g.vision_layers})")

    def layer(tokens: int) -> int:
        return layer_flops(tokens, tokens, g.vision_hidden, g.vision_hidden, g.vision_intermediate,
                           g.vision_ffn_matrices)

    embedding = 2 * patches * g.patch_dim * g.vision_hidden
    layers = (crops - len(shortened)) * g.vision_layers * layer(n) + sum(layer(c) for cs in shortened for c in cs)
    projector = sum(2 * visual_tokens * a * b for a, b in g.projector)
    return crops * embedding + layers + projector


def audio_flops(g: Geometry, mel_frames: int) -> int:
    """Qwen2.5-Omni's audio tower on one clip of ``mel_frames`` frames: conv1 (kernel 3, mel bins -> d), conv2
    (kernel 3, stride 2), the encoder layers attending within chunks of ``audio_window`` frames (half as many
    tokens after conv2; the last chunk may be shorter), 2x average pooling and the projection to ``audio_out``."""
    if not g.audio_layers:
        raise ValueError("this model has no audio tower")
    after_conv = (mel_frames + 1) // 2
    convs = 2 * mel_frames * 3 * g.audio_mel_bins * g.audio_hidden + 2 * after_conv * 3 * g.audio_hidden ** 2
    chunk = g.audio_window // 2
    chunks = [chunk] * (after_conv // chunk) + ([after_conv % chunk] if after_conv % chunk else [])
    layers = g.audio_layers * sum(layer_flops(n, n, g.audio_hidden, g.audio_hidden, g.audio_intermediate, 2)
                                  for n in chunks)
    return convs + layers + 2 * (after_conv // 2) * g.audio_hidden * g.audio_out


def llm_prefill_flops(g: Geometry, text_tokens: int, visual_per_layer: list[int], logits: int = 1) -> int:
    """The decoder at prefill: layer ``l`` runs on ``text_tokens + visual_per_layer[l]`` tokens; LM head on
    ``logits`` tokens."""
    if len(visual_per_layer) != g.layers:
        raise ValueError(f"visual_per_layer has {len(visual_per_layer)} entries for {g.layers} layers")
    kv_dim = g.kv_heads * g.head_dim
    total = sum(layer_flops(text_tokens + v, text_tokens + v, g.hidden, kv_dim, g.intermediate, g.ffn_matrices)
                for v in visual_per_layer)
    return total + 2 * logits * g.hidden * g.vocab


def decode_flops(g: Geometry, cache_per_layer: list[int], steps: int) -> int:
    """``steps`` greedy decode steps of one token after a prefill that left ``cache_per_layer`` keys per layer."""
    kv_dim = g.kv_heads * g.head_dim
    total = 0
    for step in range(steps):
        total += sum(layer_flops(1, c + step + 1, g.hidden, kv_dim, g.intermediate, g.ffn_matrices)
                     for c in cache_per_layer)
        total += 2 * g.hidden * g.vocab
    return total


def prefill_flops(g: Geometry, text_tokens: int, visual_per_layer: list[int], crops: int,
                  visual_before: int, tokens_per_crop: int | None = None,
                  projected: int | None = None, audio_frames: tuple[int, ...] = (),
                  encoder_tokens: list[list[int]] | None = None) -> dict[str, int]:
    """FLOPs of one sample's prefill, split: ``vision`` (tower + projector), ``llm`` and ``total``. The projector
    maps the ``visual_before`` tokens the LLM would receive, or ``projected`` tokens where pooling follows it
    (LLaVA-OneVision's videos: every frame patch is projected, then the frame is pooled; FlowCut: the tokens that
    reached the feature layer). ``audio_frames``: the mel frames of each audio clip, counted in ``vision`` through
    :func:`audio_flops` (Qwen2.5-Omni). ``encoder_tokens``: see :func:`vision_flops`."""
    vision = vision_flops(g, crops, tokens_per_crop, visual_before if projected is None else projected,
                          encoder_tokens)
    vision += sum(audio_flops(g, frames) for frames in audio_frames)
    llm = llm_prefill_flops(g, text_tokens, visual_per_layer)
    return {"vision": vision, "llm": llm, "total": vision + llm}


def tower_counts(sample: dict) -> dict:
    """:func:`prefill_flops` keyword arguments for a stats sample (``pruner.stats["samples"][i]``) whose images were
    pruned inside the vision tower (FlowCut): ``encoder_tokens`` (their per-layer counts) and ``projected`` (the
    tokens the projector maps: those that reached the feature layer, the other images' whole count). Empty for
    every other method."""
    images = sample.get("images", [])
    shortened = [image["encoder_tokens_per_layer"] for image in images if "encoder_tokens_per_layer" in image]
    if not shortened:
        return {}
    projected = sum(image["after"] if "encoder_tokens_per_layer" in image else image["before"] for image in images)
    return {"encoder_tokens": shortened, "projected": projected}
