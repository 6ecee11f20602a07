"""Everything mmprune assumes about transformers' internals, in one place.

mmprune hooks stock Hugging Face models, so it depends on details transformers does not promise to keep: the name
of the KV-cache argument (``past_key_values`` until 5.23, ``cache`` from 5.24), the arguments of
``create_causal_mask``, what ``get_image_features`` returns, the attributes of attention modules, the vision rope
helpers. Each such detail is read here and nowhere else, so the next rename is one edit in this file.

:data:`ASSUMPTIONS` lists them as named checks. :func:`verify` runs the ones that apply to a model when a method
attaches, so a release that breaks one fails at attach with a message naming the assumption and the installed
version, instead of a shape error deep inside SDPA or, worse, a silently unpruned forward.
``tests/test_upstream.py`` runs every check on the tiny model of each family (the contract tests).

:data:`TESTED_TRANSFORMERS` is the range CI runs the suite on (its oldest and newest release); ``pyproject.toml``
declares the same range. Outside it, attaching warns once (:func:`check_version`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

# The releases the whole suite passes on; CI runs it on both ends. pyproject.toml's dependency must say the same
# (tests/test_upstream.py checks). Lower bound: create_causal_mask takes `layer_idx` (needed for masks of layers
# whose cache was shortened) from 5.14 on.
TESTED_TRANSFORMERS = ">=5.14.0,<5.25"
OLDEST_TESTED = "5.14.0"


class UpstreamVersionWarning(UserWarning):
    """The installed transformers is outside the range mmprune is tested on."""


class UpstreamMismatch(RuntimeError):
    """The installed transformers no longer matches one of mmprune's assumptions about its internals."""


def transformers_version() -> str:
    return transformers.__version__


def in_tested_range(version: str | None = None) -> bool:
    return Version(version or transformers_version()) in SpecifierSet(TESTED_TRANSFORMERS)


@functools.lru_cache(maxsize=None)
def check_version(version: str | None = None) -> bool:
    """Warn (once per process and version) when ``version`` (default: the installed one) is outside the tested
    range. Returns whether it is inside."""
    version = version or transformers_version()
    inside = in_tested_range(version)
    if not inside:
        warnings.warn(
            f"mmprune is tested with transformers {TESTED_TRANSFORMERS} and transformers {version} is installed: "
            "mmprune checks the internals it hooks at attach and refuses what it can detect, but results on this "
            f"release are untested; install a tested one, e.g. pip install 'transformers{TESTED_TRANSFORMERS}'",
            UpstreamVersionWarning,
            stacklevel=3,
        )
    return inside


def mismatch(assumption: str, detail: str) -> UpstreamMismatch:
    return UpstreamMismatch(
        f"transformers {transformers_version()} breaks mmprune's assumption '{assumption}': {detail} "
        f"(mmprune is tested with transformers {TESTED_TRANSFORMERS})")


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    # inspect.signature follows __wrapped__, so decorated forwards (deprecate_kwarg, can_return_tuple) show their
    # real parameters
    return dict(inspect.signature(function).parameters)


def accepts(function: Callable, name: str) -> bool:
    """Whether ``function`` (a model's forward) takes the argument ``name``."""
    return name in _parameters(function)


def load_image_processor(source: str) -> Any:
    """The model's image processor. Without torchvision, ``AutoImageProcessor`` refuses outright on some releases
    (5.14-5.2x); the PIL class of the saved type (``<type>Pil``) loads the same settings."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return AutoImageProcessor.from_pretrained(source)
    except ImportError:
        saved = ImageProcessingMixin.get_image_processor_dict(source)[0].get("image_processor_type", "")
        name = saved if saved.endswith("Pil") else saved.removesuffix("Fast") + "Pil"
        cls = getattr(transformers, name, None)
        if cls is None:
            raise
        return cls.from_pretrained(source)


def video_pixel_bounds(processor: Any) -> tuple[int, int] | None:
    """``(min_pixels, max_pixels)`` per video frame from a processor's video processor (its ``size``'s
    ``shortest_edge`` / ``longest_edge``, which Qwen's video processors read as pixel counts), else from the
    ``video_size`` a :class:`mmprune.loading.MediaParts` read from the saved config; ``None`` when neither has one."""
    size = getattr(getattr(processor, "video_processor", None), "size", None) or getattr(processor, "video_size", None)
    if not size or "longest_edge" not in size:
        return None
    return int(size.get("shortest_edge") or 0), int(size["longest_edge"])


def saved_video_size(source: str) -> dict | None:
    """The ``size`` of a checkpoint's ``video_preprocessor_config.json`` (or its ``min_pixels`` / ``max_pixels``),
    read as JSON: the video processor class itself cannot be built without torchvision."""
    import json

    from transformers.utils import cached_file

    path = cached_file(source, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path) as handle:
        config = json.load(handle)
    size = dict(config.get("size") or {})
    if config.get("min_pixels") is not None:
        size["shortest_edge"] = config["min_pixels"]
    if config.get("max_pixels") is not None:
        size["longest_edge"] = config["max_pixels"]
    return size or None


def qwen_smart_resize() -> Callable:
    """Qwen2-VL's ``smart_resize(height, width, factor, min_pixels, max_pixels)``: the frame size, in multiples of
    ``factor``, whose pixel count lies in the bounds. From the PIL image processor's module, which (unlike the
    torchvision one) imports without torchvision."""
    try:
        return importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    except (ImportError, AttributeError) as exc:
        raise mismatch("Qwen2-VL's PIL image processor module defines smart_resize", str(exc)) from None


# ---------------------------------------------------------------------------------------------- the KV cache
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")  # 5.24 renamed past_key_values to cache


def cache_argument(forward: Callable) -> str:
    """The name under which ``forward`` (a language model's or decoder layer's) takes the KV cache."""
    params = _parameters(forward)
    for name in CACHE_ARGUMENT_NAMES:
        if name in params:
            return name
    raise mismatch("forwards take the KV cache as `cache` or `past_key_values`",
                   f"{getattr(forward, '__qualname__', forward)} takes {', '.join(params)}")


def output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    for name in CACHE_ARGUMENT_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def new_cache(config: Any) -> Any:
    """The default KV cache a language model would create for itself."""
    return transformers.DynamicCache(config=config)


def is_default_cache(cache: Any) -> bool:
    """Whether ``cache`` is the default dynamic cache, the only one whose layers may hold different lengths."""
    return isinstance(cache, transformers.DynamicCache)


def cache_length(cache: Any, layer: int = 0) -> int:
    return int(cache.get_seq_length(layer))


def cache_layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each attention layer of a dynamic cache (a linear-attention layer, Qwen3.5's, holds a
    fixed-size state and no keys: it is left out)."""
    return [(layer.keys, layer.values) for layer in cache.layers if hasattr(layer, "keys")]


def gather_cache_layer(cache: Any, layer: int, index: torch.Tensor) -> None:
    """Keep, in decoder ``layer``'s cache, the tokens at ``index`` ``(B, L')`` of its sequence axis, per row. A
    sliding-window layer's cache must still hold its whole sequence (it forgets tokens beyond the window); a
    linear-attention layer's recurrent state cannot give tokens back: both refuse."""
    entry = cache.layers[layer]
    if not hasattr(entry, "keys"):
        raise ValueError(f"decoder layer {layer} is linear attention: its recurrent state has absorbed every token "
                         "that entered it and cannot drop some")
    if entry.keys is None or entry.keys.numel() == 0:
        return
    seen = getattr(entry, "cumulative_length", None)
    if seen is not None and int(seen) != entry.keys.shape[-2]:
        raise ValueError(f"decoder layer {layer} is a sliding-window layer whose cache kept only the last "
                         f"{entry.keys.shape[-2]} of {int(seen)} tokens; the ones it dropped cannot be selected")
    for name in ("keys", "values"):
        tensor = getattr(entry, name)
        picked = index.to(tensor.device)[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1])
        setattr(entry, name, tensor.gather(2, picked))
    if seen is not None:
        entry.cumulative_length = int(index.shape[1])


# ---------------------------------------------------------------------------------------------- masks
@functools.lru_cache(maxsize=1)
def _mask_function() -> tuple[Callable, str]:
    from transformers.masking_utils import create_causal_mask

    params = _parameters(create_causal_mask)
    if "layer_idx" not in params:
        raise mismatch("create_causal_mask takes layer_idx", f"its parameters are {', '.join(params)}")
    for name in CACHE_ARGUMENT_NAMES:
        if name in params:
            return create_causal_mask, name
    raise mismatch("create_causal_mask takes the cache as `cache` or `past_key_values`",
                   f"its parameters are {', '.join(params)}")


# Decoder layer kinds the engine follows (``config.layer_types``): attention over every earlier token, attention within
# a sliding window (Gemma 3's local layers), and linear attention (Qwen3.5's Gated DeltaNet: a recurrent state, no
# KV cache, so no attention weights to score with).
LAYER_KINDS = ("full_attention", "sliding_attention", "linear_attention")
ATTENTION_KINDS = ("full_attention", "sliding_attention")


def layer_kinds(language_model: nn.Module) -> list[str]:
    """Each decoder layer's kind: ``config.layer_types`` where the model has one, else every layer is full
    attention."""
    count = len(decoder_layers(language_model))
    kinds = getattr(language_model.config, "layer_types", None)
    return list(kinds[:count]) if kinds else ["full_attention"] * count


def layer_mask(language_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
               cache: Any, layer_idx: int, blocks: torch.Tensor | None = None) -> Any:
    """transformers' own mask for decoder layer ``layer_idx`` (whose cache may be shorter than the others'), from the
    2-D mask of the sequence the layer attends over, in the format of the model's attention implementation and of
    the layer's kind (``masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING``: the causal mask, the sliding-window
    one, or the 2-D padding mask of linear-attention layers). ``blocks`` ``(B, L)``: Gemma 3's bidirectional media
    blocks at prefill (block id per token, -1 outside), composed as its ``create_masks_for_vision_model`` does:
    OR(causal, block) on full layers, AND(window, OR(causal, block)) on sliding ones."""
    from transformers import masking_utils

    config = language_model.config
    kind = layer_kinds(language_model)[layer_idx]
    function = masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(kind)
    if kind not in LAYER_KINDS or function is None:
        raise mismatch(f"decoder layers are one of {', '.join(LAYER_KINDS)} with a mask function in "
                       "masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING", f"layer {layer_idx} is {kind!r}")
    _, cache_name = _mask_function()
    arguments = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     **{cache_name: cache})
    if kind == "linear_attention":
        return function(**arguments)
    arguments.update(position_ids=None, layer_idx=layer_idx)
    if blocks is None:
        return function(**arguments)
    if kind == "full_attention":
        return masking_utils.create_causal_mask(**arguments, block_sequence_ids=blocks)
    early_exit, *_, kv_length, _, kv_offset = masking_utils._preprocess_mask_arguments(
        config, inputs_embeds, attention_mask, cache, None, layer_idx)
    if not early_exit:  # the overlay reads block ids by key index: padded to the key length, as Gemma 3 does
        blocks = masking_utils.maybe_pad_block_sequence_ids(blocks, attention_mask, kv_length, kv_offset)
    return masking_utils.create_causal_mask(
        **arguments, or_mask_function=masking_utils.blockwise_overlay(blocks),
        and_mask_function=masking_utils.sliding_window_overlay(config.sliding_window))


def mask_mapping(language_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: Any, blocks: torch.Tensor | None = None) -> dict:
    """The per-kind masks a language model that takes a prepared mapping reads (``{layer_type: mask}``, indexed by
    ``config.layer_types``, as Gemma 3's multimodal forward prepares it), each built against the first layer of its
    kind."""
    first: dict[str, int] = {}
    for index, kind in enumerate(layer_kinds(language_model)):
        first.setdefault(kind, index)
    return {kind: layer_mask(language_model, inputs_embeds, attention_mask, cache, index, blocks)
            for kind, index in first.items()}


def length_layer(language_model: nn.Module) -> int:
    """The first decoder layer whose cache counts the tokens it has seen (an attention layer: linear-attention
    layers keep a state, not a sequence)."""
    return next(i for i, kind in enumerate(layer_kinds(language_model)) if kind in ATTENTION_KINDS)


def sliding_window(language_model: nn.Module, layer_idx: int) -> int | None:
    """The window of a sliding-attention layer (a query sees keys less than this many positions back), else None."""
    if layer_kinds(language_model)[layer_idx] != "sliding_attention":
        return None
    return int(language_model.config.sliding_window)


# ---------------------------------------------------------------------------------------------- model inputs
# Forward arguments that carry each input modality (generate() pre-encodes them into `mm_encoder_outputs`, keyed by
# modality, from 5.2x on).
MODALITY_ARGUMENTS = {
    "image": ("pixel_values",),
    "video": ("pixel_values_videos",),
    "audio": ("input_features", "input_audio_features"),
}
PRE_ENCODED_ARGUMENT = "mm_encoder_outputs"


def modalities_in(arguments: dict) -> set[str]:
    """Input modalities a multimodal forward's bound ``arguments`` carry (as pixels/features or pre-encoded)."""
    found = {modality for modality, names in MODALITY_ARGUMENTS.items()
             if any(arguments.get(name) is not None for name in names)}
    encoded = arguments.get(PRE_ENCODED_ARGUMENT) or {}
    found |= {modality for modality, value in encoded.items() if value is not None}
    return found


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """``mm_token_type_ids`` as the Qwen processors give them (text 0, image 1, video 2); from 5.2x
    ``get_rope_index`` needs them to compute M-RoPE positions."""
    return (input_ids == image_token_id).int() + 2 * (input_ids == video_token_id).int()


def feature_getters(owner: nn.Module) -> dict[str, str]:
    """``{modality: method name}`` of the encoders a multimodal model exposes (``get_image_features``, ...)."""
    return {modality: f"get_{modality}_features" for modality in MODALITY_ARGUMENTS
            if callable(getattr(owner, f"get_{modality}_features", None))}


def image_features(output: Any) -> list[torch.Tensor]:
    """Per image or video, the ``(tokens, hidden)`` LLM-space features ``get_image_features`` /
    ``get_video_features`` returned (LLaVA-NeXT-Video gives ``(frames, tokens, hidden)`` per video before 5.21 and
    ``(frames * tokens, hidden)`` since; both are flattened here)."""
    features = getattr(output, "pooler_output", None)
    if features is None:
        raise mismatch("get_image_features returns an output whose pooler_output holds one tensor per image",
                       f"it returned {type(output).__name__}")
    return [feature.reshape(-1, feature.shape[-1]) for feature in features]


# ---------------------------------------------------------------------------------------------- the language model
@dataclass(frozen=True)
class AttentionParts:
    """What mmprune reads of a decoder layer to recompute attention rows (the model keeps its implementation)."""

    norm: nn.Module  # input_layernorm
    q_proj: nn.Module
    k_proj: nn.Module
    head_dim: int
    scaling: float
    q_norm: nn.Module  # per-head RMSNorm of queries and keys before RoPE (Qwen3); identity where absent
    k_norm: nn.Module
    gated_query: bool = False  # q_proj's output is [query | gate] per head (Qwen3.5); the query is the first half

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, q, H, head_dim)`` per-head queries of ``hidden`` ``(B, q, D)`` before norm and RoPE."""
        projected = self.q_proj(hidden)
        width = 2 * self.head_dim if self.gated_query else self.head_dim
        return projected.view(*hidden.shape[:2], -1, width)[..., :self.head_dim]


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    return language_model.layers


def attention_parts(layer: nn.Module) -> AttentionParts:
    attn = layer.self_attn
    head_dim = int(attn.head_dim)
    heads = int(getattr(attn.config, "num_attention_heads", 0)) if hasattr(attn, "config") else 0
    # Qwen3.5's gated attention: q_proj gives, per head, the query then an output gate of the same width
    gated = bool(heads) and attn.q_proj.out_features == 2 * heads * head_dim
    return AttentionParts(norm=layer.input_layernorm, q_proj=attn.q_proj, k_proj=attn.k_proj,
                          head_dim=head_dim, scaling=float(attn.scaling),
                          q_norm=getattr(attn, "q_norm", None) or nn.Identity(),
                          k_norm=getattr(attn, "k_norm", None) or nn.Identity(), gated_query=gated)


def final_norm(language_model: nn.Module) -> nn.Module:
    return language_model.norm


def rotary_embedding(language_model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                     kind: str = "full_attention"):
    """(cos, sin) the language model's rotary embedding gives ``position_ids`` for layers of ``kind`` (Gemma 3's
    rotary embedding takes the layer type: local and global layers use different bases)."""
    if accepts(language_model.rotary_emb.forward, "layer_type"):
        return language_model.rotary_emb(hidden, position_ids, kind)
    return language_model.rotary_emb(hidden, position_ids)


def rope_tables(language_model: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B|1, L, head_dim)`` cos/sin as applied to queries and keys. Before 5.17 the M-RoPE models' rotary
    embedding returned one table per section ``(3, B, L, head_dim)``, interleaved inside the attention by
    ``mrope_section``; they are combined here the same way."""
    if cos.dim() == 3:
        return cos, sin
    section = list(_rope_config(language_model.config)["mrope_section"]) * 2

    def combine(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[i % 3] for i, part in enumerate(table.split(section, dim=-1))], dim=-1)

    return combine(cos), combine(sin)


def _rope_config(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "mrope_section" not in rope:
        raise mismatch("M-RoPE configs hold mrope_section in rope_parameters", f"they hold {sorted(rope)}")
    return rope


# Decoder-layer keyword arguments the engine replaces after a stage (besides the cache, which it only reads).
LAYER_ARGUMENTS = ("attention_mask", "position_ids", "position_embeddings")


# ---------------------------------------------------------------------------------------------- benchmarks
# What `mmprune bench --speed` relies on (mmprune/bench/side_by_side.py, reference.py), 5.14 .. 5.24: multimodal
# forwards take `logits_to_keep` (the LM head on the last positions only, as generate's prefill); every attention
# module reads its config's `_attn_implementation` when called (so switching it for one call runs that call eagerly)
# and returns (output, weights), the weights (B, heads, q, L) under eager attention (None under SDPA); a CLIP tower
# called with output_attentions=True under eager attention returns one such tensor per layer in `.attentions`.
LAST_LOGITS_ARGUMENT = "logits_to_keep"
# the encoder modules of a multimodal model (its .model): CLIP/SigLIP tower and projector (LLaVA family), the Qwen
# vision tower with its merger, the Omni audio tower, the SigLIP tower and connector of Idefics3 / SmolVLM
ENCODER_MODULES = ("vision_tower", "multi_modal_projector", "visual", "audio_tower", "vision_model", "connector")


def last_logits_only(model: nn.Module) -> dict:
    """Forward keyword arguments that compute the logits of the last position only (``generate``'s prefill)."""
    if not accepts(model.forward, LAST_LOGITS_ARGUMENT):
        raise mismatch(f"multimodal forwards take {LAST_LOGITS_ARGUMENT}",
                       f"{type(model).__name__}.forward takes {', '.join(_parameters(model.forward))}")
    return {LAST_LOGITS_ARGUMENT: 1}


@contextlib.contextmanager
def attention_implementation(config: Any, name: str):
    """Within the block, the attention modules built from ``config`` run ``name`` (``"eager"``: with attention
    weights), as transformers' SDPA attention fell back to eager for a layer asked for its weights before 5.x."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def attention_weights(output: Any) -> torch.Tensor:
    """The ``(B, heads, q, L)`` weights an attention module's forward returned (eager attention)."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if not isinstance(weights, torch.Tensor):
        raise mismatch("eager attention modules return (output, weights)",
                       f"got {type(output).__name__} whose second item is {type(weights).__name__}")
    return weights


def decoder_layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor from 5.x; a tuple whose first item they are before)."""
    return output[0] if isinstance(output, tuple) else output


def runs_causal_without_mask(config: Any) -> bool:
    """Whether ``config``'s attention implementation makes a mask-less call causal (SDPA's ``is_causal``,
    FlashAttention); eager attention needs an explicit causal mask."""
    return config._attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3")


def encoder_modules(inner: nn.Module) -> list[nn.Module]:
    """The encoder modules (:data:`ENCODER_MODULES`) a multimodal model's ``.model`` holds."""
    return [getattr(inner, name) for name in ENCODER_MODULES if isinstance(getattr(inner, name, None), nn.Module)]


def tower_attentions(tower: nn.Module, pixel_values: torch.Tensor) -> tuple[tuple, tuple]:
    """``(hidden_states, attentions)`` of a CLIP tower run eagerly with ``output_attentions`` (every layer's
    weights), as LLaVA-based reference code asks for them."""
    with attention_implementation(tower.config, "eager"):
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    if not out.attentions or out.attentions[0] is None:
        raise mismatch("a CLIP tower called with output_attentions=True under eager attention returns them",
                       f"{type(tower).__name__} returned {type(out.attentions).__name__}")
    return out.hidden_states, out.attentions


# ---------------------------------------------------------------------------------------------- vision towers
@dataclass(frozen=True)
class ClipAttentionParts:
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    head_dim: int
    scale: float
    # InternViT normalises the full-width query and key outputs (``use_qk_norm``; Identity otherwise and on CLIP)
    q_norm: nn.Module = nn.Identity()
    k_norm: nn.Module = nn.Identity()

    def queries_keys(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width (unsplit) queries of the ``queries`` rows and keys of the ``keys`` rows, norms applied."""
        return self.q_norm(self.q_proj(queries)), self.k_norm(self.k_proj(keys))


# CLIP and SigLIP towers: ``(vision_model.)encoder.layers[i].self_attn``; InternViT (InternVL):
# ``encoder.layer[i].attention``, same q_proj / k_proj / num_heads / head_dim / scale, plus q_norm / k_norm
def clip_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    encoder = getattr(tower, "vision_model", tower).encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def has_clip_encoder(tower: nn.Module) -> bool:
    return hasattr(getattr(tower, "vision_model", tower), "encoder")


def vision_attention_module(layer: nn.Module) -> nn.Module:
    """A tower layer's attention module (hooked for its input, the layer-normed hidden states)."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def internvl_pixel_shuffle(inner: nn.Module, grid: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle, ``(B, s, s, C)`` -> ``(B, s r, s r, C / r^2)`` (the model's own method)."""
    return inner.pixel_shuffle(grid, scale_factor=ratio)


def gemma3_pool(inner: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Gemma 3's projector pooling, ``(B, P*P, C)`` patch rows -> ``(B, T*T, C)`` token rows: the patch grid laid out
    as its projector does and averaged by the projector's own ``avg_pool``."""
    projector = inner.multi_modal_projector
    side = int(projector.patches_per_image)
    grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[-1], side, side)
    return projector.avg_pool(grid).flatten(2).transpose(1, 2)


def gemma3_project(inner: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Gemma 3's projector after the pooling (RMSNorm, then the input projection matrix): pooled SigLIP vectors ->
    LLM embeddings."""
    projector = inner.multi_modal_projector
    return torch.matmul(projector.mm_soft_emb_norm(pooled), projector.mm_input_projection_weight).type_as(pooled)


def gemma3_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Gemma 3's bidirectional blocks (block id per token, -1 outside) from ``token_type_ids`` (1 at image tokens),
    by the model's own rule."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    return get_block_sequence_ids_for_mask(token_type_ids, device=token_type_ids.device)


def vision_last_hidden_state(output: Any) -> torch.Tensor:
    """The vision tower's last hidden states that ``get_image_features`` returned beside the projected features
    (Gemma 3: SigLIP's output after its post-layernorm, ``(images, patches, C)``)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise mismatch("get_image_features returns the tower's last_hidden_state beside pooler_output",
                       f"it returned {type(output).__name__} without it")
    return hidden


def clip_attention(layer: nn.Module) -> ClipAttentionParts:
    attn = vision_attention_module(layer)
    norms = {name: getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)}
    return ClipAttentionParts(q_proj=attn.q_proj, k_proj=attn.k_proj, num_heads=int(attn.num_heads),
                              head_dim=int(attn.head_dim), scale=float(attn.scale), **norms)


# What in-tower pruning (FlowCut, mmprune/models/clip_pruning.py) relies on, 5.14 .. 5.24: the encoder calls each
# CLIPEncoderLayer as a module with the hidden states first (positional, else `hidden_states=`) and a tensor (B, L,
# D) in and out, so a forward pre-hook may hand it a shorter sequence; CLIP positions are added in the embeddings,
# before the layers, and the vision attention has no mask, so a shorter sequence is a valid input. Its attention
# calls the q_proj / k_proj / v_proj modules once each on the layer-normed input and splits heads as
# view(B, L, heads, head_dim); the query scaling (`scale`) is applied inside the attention function.
def clip_layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a CLIP encoder layer is called with."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise mismatch("CLIP encoder layers take the (B, L, D) hidden states as their first argument",
                       f"got {type(hidden).__name__}")
    return hidden


def with_clip_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A CLIP encoder layer's call arguments with ``hidden`` in place of its hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def clip_value_projections(layer: nn.Module) -> dict[str, nn.Module]:
    """``{"q", "k", "v"}``: the projection modules a CLIP layer's attention calls on its input."""
    attn = layer.self_attn
    return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}


def clip_heads(layer: nn.Module, projected: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(B, heads, L, head_dim)`` queries, keys and values from the outputs of the layer's projections (queries
    unscaled: multiply their products by ``clip_attention(layer).scale``)."""
    parts = clip_attention(layer)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], parts.num_heads, parts.head_dim).transpose(1, 2)

    return split(projected["q"]), split(projected["k"]), split(projected["v"])


def tower_output_fields(output: Any) -> dict[str, Any]:
    """The fields of a vision tower's output (a ``ModelOutput``: last_hidden_state, pooler_output, hidden_states,
    attentions), by name."""
    if not callable(getattr(output, "keys", None)):
        raise mismatch("vision towers return a ModelOutput when called with return_dict=True",
                       f"got {type(output).__name__}")
    return {name: output[name] for name in output.keys()}


def rebuild_tower_output(template: Any, fields: dict[str, Any]) -> Any:
    """A vision tower output of ``template``'s type holding ``fields``."""
    return type(template)(**fields)


def set_image_features(output: Any, features: list[torch.Tensor]) -> None:
    """Replace the per-image LLM-space features ``get_image_features`` returned (its ``pooler_output``), which the
    multimodal forward scatters into the placeholder tokens."""
    if getattr(output, "pooler_output", None) is None:
        raise mismatch("get_image_features returns an output whose pooler_output holds one tensor per image",
                       f"it returned {type(output).__name__}")
    output.pooler_output = list(features)


@dataclass(frozen=True)
class QwenVisionParts:
    """The last vision block of Qwen2-VL / Qwen2.5-VL and the helpers to recompute its attention."""

    block: nn.Module
    attention: nn.Module  # .qkv (Qwen2-VL, 2.5-VL) or .q/.k (Qwen2.5-Omni), .num_heads, .scaling
    apply_rope: Callable  # apply_rotary_pos_emb_vision(q, k, cos, sin) of the model's own module
    merge: int
    windowed: bool  # Qwen2.5-VL reorders patches by window before the blocks

    def queries_keys(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(seq, heads, head_dim)`` queries and keys of the block's attention on ``hidden`` (before RoPE)."""
        attn, seq = self.attention, hidden.shape[0]
        if hasattr(attn, "qkv"):
            q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            return q, k
        return attn.q(hidden).reshape(seq, attn.num_heads, -1), attn.k(hidden).reshape(seq, attn.num_heads, -1)


QWEN_BLOCK_ARGUMENTS = ("cu_seqlens", "position_embeddings")  # what the last block's attention is called with


def qwen_vision(visual: nn.Module) -> QwenVisionParts:
    module = importlib.import_module(type(visual).__module__)
    block = visual.blocks[-1]
    return QwenVisionParts(block=block, attention=block.attn, apply_rope=module.apply_rotary_pos_emb_vision,
                           merge=int(visual.spatial_merge_size), windowed=hasattr(visual, "fullatt_block_indexes"))


def qwen_window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL: block order position ``p`` holds raster merge unit ``window_index[p]``."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=int(visual.spatial_merge_size),
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return window_index


def llava_next_crops(image_size: Any, grid_pinpoints: Any, patch_size: int) -> int:
    """Crops (base image included) LLaVA-NeXT encodes for an image of ``image_size``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(image_size=image_size, grid_pinpoints=grid_pinpoints,
                                         patch_size=patch_size))


def llava_next_pack(inner: nn.Module, features: list[torch.Tensor], image_sizes: Any, strategy: str,
                    image_newline: torch.Tensor) -> list[torch.Tensor]:
    """The model's own ``pack_image_features``: crops -> one sequence per image with newline tokens."""
    packed, _ = inner.pack_image_features(features, image_sizes, strategy, image_newline=image_newline)
    return packed


def onevision_crops(config: Any, image_sizes: Any, batch_num_images: Any) -> list[int]:
    """Crops (base image included) LLaVA-OneVision encodes per image: anyres crops for a sample's only image, the
    base image alone when the sample has several (``batch_num_images``), as its ``get_image_features`` decides."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    patched = ([True] * len(image_sizes) if batch_num_images is None
               else [int(n) == 1 for n in batch_num_images for _ in range(int(n))])
    return [int(image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size)) if patch else 1
            for size, patch in zip(image_sizes, patched)]


def onevision_pack(inner: nn.Module, features: list[torch.Tensor], image_sizes: Any,
                   image_newline: torch.Tensor, aspect_ratio: str) -> list[torch.Tensor]:
    """LLaVA-OneVision's own ``pack_image_features``: crops -> one sequence per image (unpadded, bilinearly shrunk
    to the ``anyres_max_N`` area, newline tokens)."""
    packed, _ = inner.pack_image_features(features, image_sizes, image_newline=image_newline,
                                          vision_aspect_ratio=aspect_ratio)
    return packed


def onevision_videos(inner: nn.Module, output: Any, frames: int, per_frame: int) -> list[torch.Tensor]:
    """Per video, LLaVA-OneVision's LLM tokens: ``frames`` pooled frames of ``per_frame`` tokens and the trailing
    newline. ``get_video_features`` appends the newline itself in recent releases; before (5.14) the forward
    appended it after the call, so it is appended here to describe the tokens the prompt actually holds."""
    videos = []
    for features in image_features(output):
        if features.shape[0] == frames * per_frame:
            features = torch.cat([features, inner.image_newline[None].to(features)])
        videos.append(features)
    return videos


OMNI_FIRST = "5.21.0"  # the Omni thinkers hold their towers and decoder in .model from this release on


def check_omni_layout(model: nn.Module) -> None:
    """Omni thinkers (Qwen2.5-Omni, Qwen3-Omni) before 5.21 keep the towers on the thinker and the decoder in
    ``.model``; mmprune reads the standard layout (``.model.audio_tower/.visual/.language_model``) and refuses the
    old one."""
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("audio_tower", "visual", "language_model")):
        raise ValueError(f"{type(model).__name__}: mmprune supports the Omni thinkers from transformers "
                         f"{OMNI_FIRST} (its towers and decoder under .model); transformers {transformers_version()} "
                         "lays it out differently: upgrade transformers")


def omni_audio_attention(tower: nn.Module) -> nn.Module:
    """The last encoder layer's attention of an Omni audio tower (``q_proj``, ``k_proj``, ``num_heads``,
    ``scaling``; called with the flat hidden states and ``cu_seqlens``)."""
    return tower.layers[-1].self_attn


def audio_lengths(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Each clip's mel length from ``get_audio_features``' arguments."""
    mask = kwargs.get("feature_attention_mask", args[1] if len(args) > 1 else None)
    return mask.sum(-1) if mask is not None else kwargs.get("audio_feature_lengths", args[2] if len(args) > 2 else None)


def audio_positions_and_tokens(tower: nn.Module, lengths: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per clip of ``lengths`` mel frames: the positions the audio tower's encoder layers run on, and the tokens it
    outputs. Qwen2.5-Omni's tower method gives both (a 2x pooling follows the layers); Qwen3-Omni's module function
    gives the tokens, which are the positions (no pooling)."""
    if callable(getattr(tower, "_get_feat_extract_output_lengths", None)):
        positions, tokens = tower._get_feat_extract_output_lengths(lengths)
        return [int(n) for n in positions.tolist()], [int(n) for n in tokens.tolist()]
    module = importlib.import_module(type(tower).__module__)
    tokens = [int(n) for n in module._get_feat_extract_output_lengths(lengths).tolist()]
    return tokens, tokens


def audio_items(inner: nn.Module, output: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Per audio clip, its ``(tokens, hidden)`` LLM-space features: ``get_audio_features`` returns them flat in
    ``last_hidden_state``; each clip's count follows from its mel length (``feature_attention_mask``, else
    ``audio_feature_lengths``) through :func:`audio_positions_and_tokens`."""
    lengths = audio_lengths(args, kwargs)
    features = getattr(output, "last_hidden_state", None)
    if features is None or lengths is None:
        raise mismatch("get_audio_features returns last_hidden_state and takes feature_attention_mask or "
                       "audio_feature_lengths", f"it returned {type(output).__name__} for lengths {lengths!r}")
    return list(torch.split(features, audio_positions_and_tokens(inner.audio_tower, lengths)[1]))


# ---------------------------------------------------------------------------------------------- the contract
@dataclass(frozen=True)
class Assumption:
    """One thing mmprune relies on; ``check(adapter)`` raises :class:`UpstreamMismatch` when it no longer holds."""

    name: str
    check: Callable[[Any], None]
    families: tuple[str, ...] = ()  # empty: every family

    def applies(self, family: str) -> bool:
        return not self.families or family in self.families


def _require(condition: bool, assumption: str, detail: str) -> None:
    if not condition:
        raise mismatch(assumption, detail)


def _check_cache_argument(adapter: Any) -> None:
    lm_name = cache_argument(adapter.language_model.forward)
    layer_name = cache_argument(decoder_layers(adapter.language_model)[0].forward)
    _require(lm_name == layer_name, "the language model and its decoder layers name the cache alike",
             f"language model: {lm_name}, decoder layer: {layer_name}")


def _check_layer_arguments(adapter: Any) -> None:
    layer = decoder_layers(adapter.language_model)[0]
    params = _parameters(layer.forward)
    missing = [name for name in LAYER_ARGUMENTS if name not in params]
    _require(not missing,
             f"decoder layers take {', '.join(LAYER_ARGUMENTS)} as keyword arguments",
             f"{type(layer).__name__}.forward lacks {', '.join(missing)}")


def _check_language_model(adapter: Any) -> None:
    lm = adapter.language_model
    for attribute in ("layers", "norm", "rotary_emb"):
        _require(hasattr(lm, attribute), "the language model has .layers, .norm and .rotary_emb",
                 f"{type(lm).__name__} has no .{attribute}")
    try:
        for layer, kind in zip(decoder_layers(lm), layer_kinds(lm)):
            if kind in ATTENTION_KINDS:  # linear-attention layers (Qwen3.5's Gated DeltaNet) have no self_attn
                attention_parts(layer)
    except AttributeError as exc:
        raise mismatch("decoder layers have input_layernorm and self_attn.q_proj/k_proj/head_dim/scaling",
                       str(exc)) from None


def _check_mask_function(adapter: Any) -> None:
    _mask_function()


def _check_image_features(adapter: Any) -> None:
    owner = adapter.image_features_owner()
    _require(callable(getattr(owner, "get_image_features", None)),
             "the multimodal model encodes images with get_image_features", f"{type(owner).__name__} has none")
    params = _parameters(adapter.inner.forward)
    for name in ("input_ids", "pixel_values", "attention_mask", "position_ids"):
        _require(name in params, "the multimodal forward takes input_ids, pixel_values, attention_mask, "
                 "position_ids", f"{type(adapter.inner).__name__}.forward lacks {name}")
    multimodal_decoder(adapter.inner)  # .language_model (.text_model on Idefics3 / SmolVLM)


def _check_dynamic_cache(adapter: Any) -> None:
    cache = new_cache(adapter.language_model.config)
    for name in ("get_seq_length", "layers"):
        _require(hasattr(cache, name), "DynamicCache(config=...) has get_seq_length(layer) and .layers",
                 f"it has no {name}")


def _check_clip(adapter: Any) -> None:
    if getattr(adapter, "clip", None) is None:
        return
    try:
        clip_attention(adapter.clip.layer)
    except AttributeError as exc:
        raise mismatch("CLIP attention has q_proj, k_proj, num_heads, head_dim, scale", str(exc)) from None


def _check_clip_layers(adapter: Any) -> None:
    if getattr(adapter, "clip", None) is None:
        return
    layer = adapter.clip.layer
    params = list(_parameters(layer.forward))
    _require(bool(params) and params[0] == "hidden_states", "CLIP encoder layers take hidden_states first",
             f"{type(layer).__name__}.forward takes {', '.join(params)}")
    try:
        projections = clip_value_projections(layer)
    except AttributeError as exc:
        raise mismatch("CLIP attention has q_proj, k_proj and v_proj modules", str(exc)) from None
    _require(all(isinstance(p, nn.Module) for p in projections.values()),
             "CLIP attention has q_proj, k_proj and v_proj modules", "they are not modules")
    params = list(_parameters(adapter.inner.vision_tower.forward))
    _require(bool(params) and params[0] == "pixel_values", "the vision tower takes pixel_values first",
             f"{type(adapter.inner.vision_tower).__name__}.forward takes {', '.join(params)}")


def _check_llava_next(adapter: Any) -> None:
    from transformers.models.llava_next import modeling_llava_next

    _require(hasattr(modeling_llava_next, "image_size_to_num_patches"),
             "modeling_llava_next.image_size_to_num_patches exists", "it is gone")
    params = _parameters(adapter.inner.pack_image_features)
    _require("image_newline" in params, "pack_image_features(features, image_sizes, strategy, image_newline)",
             f"its parameters are {', '.join(params)}")


def _check_onevision(adapter: Any) -> None:
    from transformers.models.llava_onevision import modeling_llava_onevision

    _require(hasattr(modeling_llava_onevision, "image_size_to_num_patches"),
             "modeling_llava_onevision.image_size_to_num_patches exists", "it is gone")
    params = _parameters(adapter.inner.pack_image_features)
    _require("image_newline" in params and "vision_aspect_ratio" in params,
             "pack_image_features(features, image_sizes, image_newline, vision_aspect_ratio)",
             f"its parameters are {', '.join(params)}")
    _require(callable(getattr(adapter.inner, "apply_pooling", None)) and hasattr(adapter.inner, "image_newline"),
             "LLaVA-OneVision pools video frames in apply_pooling and ends a video with image_newline",
             f"{type(adapter.inner).__name__} lacks apply_pooling or image_newline")


def _check_video_pooler(adapter: Any) -> None:
    _require(hasattr(adapter.inner, "vision_resampler") and hasattr(adapter.config, "spatial_pool_stride"),
             "LLaVA-NeXT-Video pools frames with spatial_pool_stride in vision_resampler",
             f"{type(adapter.inner).__name__} has no vision_resampler or the config no spatial_pool_stride")


def _check_qwen_vision(adapter: Any) -> None:
    try:
        parts = qwen_vision(adapter.inner.visual)
        projections = ("qkv",) if hasattr(parts.attention, "qkv") else ("q", "k")  # Qwen2.5-Omni: separate
        for attribute in (*projections, "num_heads", "scaling"):
            getattr(parts.attention, attribute)
    except AttributeError as exc:
        raise mismatch("Qwen vision blocks have attn.qkv (or attn.q and attn.k), num_heads, scaling and the module "
                       "defines apply_rotary_pos_emb_vision", str(exc)) from None
    params = _parameters(parts.attention.forward)
    missing = [name for name in QWEN_BLOCK_ARGUMENTS if name not in params]
    _require(not missing, f"the vision attention takes {', '.join(QWEN_BLOCK_ARGUMENTS)}",
             f"it lacks {', '.join(missing)}")
    if parts.windowed:
        from transformers import vision_utils

        _require(hasattr(vision_utils, "get_vision_window_index"), "vision_utils.get_vision_window_index exists",
                 "it is gone")


def _check_omni_audio(adapter: Any) -> None:
    tower = getattr(adapter.inner, "audio_tower", None)
    module = importlib.import_module(type(tower).__module__)
    _require(callable(getattr(tower, "_get_feat_extract_output_lengths", None))
             or callable(getattr(module, "_get_feat_extract_output_lengths", None)),
             "the Omni audio tower (or its module) has _get_feat_extract_output_lengths",
             f"{type(tower).__name__} has none")
    attention = omni_audio_attention(tower)
    missing = [name for name in ("q_proj", "k_proj", "num_heads", "scaling") if not hasattr(attention, name)]
    _require(not missing, "the audio tower's last layer attention has q_proj, k_proj, num_heads, scaling",
             f"it lacks {', '.join(missing)}")
    _require("cu_seqlens" in _parameters(attention.forward), "the audio attention takes cu_seqlens",
             f"its parameters are {', '.join(_parameters(attention.forward))}")
    params = _parameters(adapter.inner.get_audio_features)
    _require("feature_attention_mask" in params, "get_audio_features(input_features, feature_attention_mask, ...)",
             f"its parameters are {', '.join(params)}")


DEEPSTACK_ARGUMENTS = ("visual_pos_masks", "deepstack_visual_embeds")


def _check_deepstack(adapter: Any) -> None:
    params = _parameters(adapter.language_model.forward)
    missing = [name for name in DEEPSTACK_ARGUMENTS if name not in params]
    _require(not missing, "the language model takes visual_pos_masks and deepstack_visual_embeds",
             f"it lacks {', '.join(missing)}")


def compact_deepstack(kwargs: dict, source: torch.Tensor, compact_mask: torch.Tensor) -> None:
    """DeepStack (Qwen3-VL/Omni) adds per-layer visual features at ``visual_pos_masks`` in the first decoder
    layers: keep the mask entries and feature rows of the tokens that survived a compaction (``source``: each
    compacted position's index in the uncompacted sequence; a merged token keeps its slot token's rows)."""
    masks, features = (kwargs.get(name) for name in DEEPSTACK_ARGUMENTS)
    if masks is None or features is None:
        return
    masks = masks.bool()
    rows = (masks.flatten().long().cumsum(0) - 1).view_as(masks)  # each visual position's row, row-major
    source = source.to(masks.device)
    keep = compact_mask.to(masks.device) & masks.gather(1, source)
    picked = rows.gather(1, source)[keep]
    kwargs["visual_pos_masks"] = keep
    kwargs["deepstack_visual_embeds"] = [feature[picked.to(feature.device)] for feature in features]


ASSUMPTIONS: list[Assumption] = [
    Assumption("language model and decoder layers take the KV cache under one name", _check_cache_argument),
    Assumption("decoder layers take attention_mask, position_ids, position_embeddings", _check_layer_arguments),
    Assumption("language model exposes layers, norm, rotary_emb and attention projections", _check_language_model),
    Assumption("create_causal_mask takes layer_idx and the cache", _check_mask_function),
    Assumption("multimodal model: get_image_features, input_ids/pixel_values forward, .language_model/.text_model",
               _check_image_features),
    Assumption("DynamicCache(config=...) with per-layer lengths", _check_dynamic_cache),
    Assumption("CLIP/SigLIP attention fields", _check_clip,
               families=("llava", "llava-next", "llava-next-video", "llava-onevision")),
    Assumption("CLIP encoder layers (hidden_states first, q/k/v projection modules) and tower (pixel_values first), "
               "for in-tower pruning", _check_clip_layers, families=("llava",)),
    Assumption("LLaVA-NeXT crop count and packing helpers", _check_llava_next,
               families=("llava-next", "llava-next-video")),
    Assumption("LLaVA-NeXT-Video pools frames with spatial_pool_stride in vision_resampler", _check_video_pooler,
               families=("llava-next-video",)),
    Assumption("LLaVA-OneVision crop count, packing, video pooling and newline", _check_onevision,
               families=("llava-onevision",)),
    Assumption("Qwen2-VL vision block, rope and window helpers", _check_qwen_vision,
               families=("qwen2-vl", "qwen2.5-omni", "qwen3-omni", "qwen3-vl")),
    Assumption("Omni audio tower and its output lengths", _check_omni_audio, families=("qwen2.5-omni", "qwen3-omni")),
    Assumption("DeepStack: the language model takes visual_pos_masks and deepstack_visual_embeds", _check_deepstack,
               families=("qwen3-omni", "qwen3-vl")),
]


def verify(adapter: Any) -> None:
    """Run every assumption that applies to ``adapter``'s family; raise the first :class:`UpstreamMismatch`."""
    for assumption in ASSUMPTIONS:
        if assumption.applies(adapter.family):
            assumption.check(adapter)


# ---------------------------------------------------------------------------------------------- Qwen3.5
# What the Qwen3.5 adapter and its pre-LLM pruning rely on, 5.14 .. 5.24: the vision tower is Qwen3-VL's without
# DeepStack (the Qwen2-VL vision checks apply; the language model takes no DeepStack arguments, so a compaction has
# nothing else to carry). The decoder's `config.layer_types` names each layer `linear_attention` (Gated DeltaNet in
# `.linear_attn`: its cache layer holds a conv state and a recurrent state, `conv_states[0]` / `recurrent_states[0]`,
# no keys or values) or `full_attention` (`.self_attn`, a KV cache). `DynamicCache(config=...)` builds those cache
# layers up front, and `get_seq_length(0)` on a linear layer 0 reports the first attention layer's length: the prompt
# as it entered the decoder, plus the decoded tokens, which is what `cache_length` reads at prefill and decode. The
# linear layers zero the padded positions of a multi-token input through their 2-D mask (so left padding leaves
# their states as a sample alone would); a single-token decode step carries no padding.
def linear_attention_states(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv state, recurrent state)`` of linear-attention decoder ``layer`` in ``cache``: ``(B, channels,
    kernel)`` (the last ``kernel`` inputs of its causal convolution) and ``(B, value heads, key dim, value dim)``."""
    entry = cache.layers[layer]
    if not hasattr(entry, "recurrent_states"):
        raise mismatch("linear-attention cache layers hold conv_states and recurrent_states",
                       f"layer {layer} is a {type(entry).__name__}")
    return entry.conv_states[0], entry.recurrent_states[0]


def _check_hybrid_decoder(adapter: Any) -> None:
    lm = adapter.language_model
    kinds = layer_kinds(lm)
    _require("linear_attention" in kinds and "full_attention" in kinds,
             "Qwen3.5 configs list linear_attention and full_attention layers in layer_types", f"they list {kinds}")
    for index, (layer, kind) in enumerate(zip(decoder_layers(lm), kinds)):
        module = "linear_attn" if kind == "linear_attention" else "self_attn"
        _require(hasattr(layer, module), f"Qwen3.5 {kind} decoder layers hold .{module}",
                 f"decoder layer {index} ({type(layer).__name__}) has none")
    cache = new_cache(lm.config)
    linear = [index for index, kind in enumerate(kinds) if kind == "linear_attention"]
    attending = kinds.index("full_attention")
    _require(len(cache.layers) == len(kinds) and all(hasattr(cache.layers[i], "recurrent_states") for i in linear)
             and hasattr(cache.layers[attending], "keys"),
             "DynamicCache(config=...) builds a linear-attention cache layer for each linear_attention layer",
             f"it built {[type(entry).__name__ for entry in cache.layers]}")
    probe = torch.zeros(1, 1, 3, 1)
    cache.layers[attending].update(probe, probe)
    _require(cache_length(cache) == 3, "get_seq_length(0) of a hybrid cache reports its first attention layer's length",
             f"it reported {cache_length(cache)} for 3 cached tokens")
    params = _parameters(lm.forward)
    present = [name for name in DEEPSTACK_ARGUMENTS if name in params]
    _require(not present, "Qwen3.5's language model takes no DeepStack arguments",
             f"it takes {', '.join(present)}")


ASSUMPTIONS.append(Assumption("Qwen3.5 vision block (Qwen2-VL's helpers, no windows)", _check_qwen_vision,
                              families=("qwen3.5",)))
ASSUMPTIONS.append(Assumption("Qwen3.5 hybrid decoder: layer_types, linear-attention cache layers, no DeepStack",
                              _check_hybrid_decoder, families=("qwen3.5",)))


# ---------------------------------------------------------------------------------------------- Idefics3 / SmolVLM
# What the Idefics3 adapter (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration) relies on, 5.14 ..
# 5.24: the multimodal model holds its decoder as .text_model (not .language_model), its SigLIP tower as
# .vision_model (encoder.layers[i].self_attn with q_proj / k_proj / num_heads / head_dim / scale, no [CLS]) and its
# connector as .connector. get_image_features drops the all-zero padding tiles of pixel_values (B, tiles, 3, H, W),
# calls the tower on the real tiles with the keyword patch_attention_mask (real tiles, H / p, W / p) derived from
# pixel_attention_mask, and hands the tower's last_hidden_state (post-layernorm, (tiles, P, C)) to the connector,
# whose pixel_shuffle(x, scale_factor) maps it to (tiles, P / s^2, s^2 C) for modality_projection (one linear layer).
# It returns the real tiles' features in tile order: one (tiles, L, D) tensor in pooler_output before 5.2x, one
# flattened (tiles of the sample * L, D) tensor per sample since.
DECODER_ATTRIBUTES = ("language_model", "text_model")


def multimodal_decoder(inner: nn.Module) -> nn.Module:
    """The decoder a multimodal model (``model.model``) runs the prompt through: ``.language_model``, or
    ``.text_model`` on Idefics3 / SmolVLM."""
    for name in DECODER_ATTRIBUTES:
        decoder = getattr(inner, name, None)
        if isinstance(decoder, nn.Module):
            return decoder
    raise mismatch("the multimodal model holds its decoder as .language_model (Idefics3 / SmolVLM: .text_model)",
                   f"{type(inner).__name__} has neither")


def idefics3_tower(inner: nn.Module) -> nn.Module:
    """Idefics3's / SmolVLM's SigLIP tower (its encoder layers: :func:`clip_encoder_layers`)."""
    return inner.vision_model


def idefics3_connector(inner: nn.Module) -> nn.Module:
    """The connector, called with the tower's post-layernorm hidden states ``(tiles, P, C)`` (hooked for them)."""
    return inner.connector


def idefics3_pixel_shuffle(inner: nn.Module, hidden: torch.Tensor, scale: int) -> torch.Tensor:
    """The connector's own pixel shuffle, ``(B, P, C)`` -> ``(B, P / s^2, s^2 C)``."""
    return inner.connector.pixel_shuffle(hidden, scale)


def idefics3_project(inner: nn.Module, shuffled: torch.Tensor) -> torch.Tensor:
    """The connector after its pixel shuffle: pixel-shuffled tower vectors -> LLM embeddings."""
    return inner.connector.modality_projection(shuffled)


def idefics3_patch_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``(tiles, H / p, W / p)`` patch mask a call of the tower carried (None: every patch is real)."""
    return kwargs.get("patch_attention_mask", args[1] if len(args) > 1 else None)


def idefics3_tile_features(output: Any, tiles: int) -> list[torch.Tensor]:
    """Per real tile, in the order the model scatters them, its ``(L, D)`` LLM-space features, from what
    ``get_image_features`` returned for ``tiles`` real tiles (per tile before 5.2x, per sample since)."""
    features = image_features(output)
    flat = torch.cat(features) if features else torch.empty(0)
    if tiles == 0 or flat.shape[0] % tiles:
        raise mismatch("get_image_features returns the same number of features for every real tile",
                       f"it returned {flat.shape[0]} features for {tiles} tiles")
    return list(flat.split(flat.shape[0] // tiles))


def _check_idefics3(adapter: Any) -> None:
    inner = adapter.inner
    missing = [name for name in ("vision_model", "connector", "text_model") if not hasattr(inner, name)]
    _require(not missing, "Idefics3 / SmolVLM hold .vision_model, .connector and .text_model",
             f"{type(inner).__name__} lacks {', '.join(missing)}")
    connector = inner.connector
    _require(callable(getattr(connector, "pixel_shuffle", None))
             and isinstance(getattr(connector, "modality_projection", None), nn.Module),
             "the Idefics3 connector has pixel_shuffle(x, scale_factor) and modality_projection",
             f"{type(connector).__name__} lacks one")
    params = _parameters(inner.get_image_features)
    _require("pixel_attention_mask" in params, "get_image_features(pixel_values, pixel_attention_mask, ...)",
             f"its parameters are {', '.join(params)}")
    params = _parameters(inner.vision_model.forward)
    _require("patch_attention_mask" in params, "the Idefics3 tower takes patch_attention_mask",
             f"its parameters are {', '.join(params)}")
    try:
        for layer in clip_encoder_layers(inner.vision_model):
            clip_attention(layer)
    except AttributeError as exc:
        raise mismatch("the Idefics3 tower's layers have self_attn with q_proj, k_proj, num_heads, head_dim, scale",
                       str(exc)) from None
    scale = int(adapter.config.scale_factor)
    side = 2 * scale  # a 2s x 2s patch grid: four tokens of s x s patches each
    probe = idefics3_pixel_shuffle(inner, torch.arange(side * side, dtype=torch.float64).view(1, -1, 1), scale)
    _require(tuple(probe.shape) == (1, 4, scale * scale),
             "the Idefics3 pixel shuffle maps (B, P, C) to (B, P / s^2, s^2 C)",
             f"a (1, {side * side}, 1) grid became {tuple(probe.shape)} with scale_factor={scale}")


ASSUMPTIONS.append(Assumption("Idefics3 / SmolVLM tower, patch mask, connector and pixel shuffle", _check_idefics3,
                              families=("idefics3",)))
