"""vLLM's LLaVA-1.5 with an mmprune pre-LLM method between the projector and the decoder (imported by vLLM only).

Two subclasses of vLLM's own classes, registered as :data:`~mmprune.integrations.vllm.ARCH`:

- :class:`PrunedLlavaProcessingInfo`: the processor writes ``output_count`` placeholder tokens per image (the
  method's count for that layout, known before the tower runs) instead of the tower's ``N``.
- :class:`MmpruneLlavaForConditionalGeneration`: the vision tower and projector run unchanged; each image's projected
  tokens become a :class:`~mmprune.media.MediaItem` whose encoder fields ([CLS] attention, keys, features of the
  feature layer, per-layer rows) are recomputed from hooked inputs by the same code as mmprune's LLaVA adapter
  (:class:`~mmprune.models.llava.ClipTower`), and the method's own ``prune_image`` chooses what enters the LLM, in
  the selection's order. vLLM numbers the pruned prompt's positions contiguously: mmprune's ``renumber``.

vLLM builds its tower only up to the feature layer, so encoder layers beyond it (which transformers runs and
discards) do not exist here; a method that reads one fails at engine start, when vLLM profiles a dummy image.
"""

from __future__ import annotations

import re
from collections import deque
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from mmprune.integrations import vllm as plugin
from mmprune.media import MediaItem, PerLayer, Segment
from mmprune.models.base import capture_input, capture_output, once
from mmprune.models.llava import EVERY_LAYER_FIELDS, LAST_LAYER_FIELDS, ClipTower


def image_segments(side: int, with_cls: bool) -> list[Segment]:
    """An image's layout as mmprune's LLaVA adapter builds it: the ``side x side`` patch grid, after [CLS] under
    ``vision_feature_select_strategy="full"``."""
    segments = [Segment(start=int(with_cls), rows=side, cols=side)]
    if with_cls:
        segments.insert(0, Segment(start=0, rows=1, cols=1))
    return segments


def settings_of(hf_config) -> dict:
    settings = getattr(hf_config, plugin.CONFIG_KEY, None)
    if settings is None:
        raise ValueError(f"{plugin.ARCH} needs the method in hf_overrides[{plugin.CONFIG_KEY!r}]: build the engine "
                         "arguments with mmprune.integrations.vllm.engine_kwargs(method, keep=...)")
    return settings


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Reserves exactly the method's output count of placeholders per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        side = config.vision_config.image_size // config.vision_config.patch_size
        with_cls = config.vision_feature_select_strategy == "full"
        if getattr(self, "_mmprune_pruner", None) is None:  # one instance per processor (checked once)
            self._mmprune_pruner = plugin.pruner(settings_of(config))
        count = self._mmprune_pruner.output_count(n, image_segments(side, with_cls))
        if count is None:  # pragma: no cover - plugin.pruner refuses variable counts
            raise ValueError("the method's output count is not known before it runs")
        return count


class _AttentionView:
    """vLLM's CLIP attention (fused ``qkv_proj``) seen through the fields mmprune's ClipTower reads."""

    def __init__(self, attention: torch.nn.Module) -> None:
        if getattr(attention, "tp_size", 1) != 1:
            raise ValueError("mmprune's vLLM plugin supports an unsharded vision tower only (tensor parallel size 1)")
        self.attention = attention
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scale
        self.width = attention.num_heads * attention.head_dim

    def _part(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        qkv, _ = self.attention.qkv_proj(hidden)
        return qkv[..., index * self.width:(index + 1) * self.width]

    def q_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 0)

    def k_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 1)


# transformers 5 saves a CLIPVisionModel tower without its ``vision_model.`` level (vision_tower.embeddings.*),
# vLLM's CLIP expects it (as llava-hf checkpoints have it): add it where it is missing
TOWER_NAMES = WeightsMapper(orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"):
                                               "vision_tower.vision_model."})


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=PrunedLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class MmpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 whose image embeddings are those the mmprune method keeps."""

    hf_to_vllm_mapper = TOWER_NAMES | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        plugin.check_vllm_version()
        config = self.config
        settings = settings_of(config)
        self.pruner = plugin.pruner(settings)
        log = int(settings.get("log") or 0)
        self.mmprune_log: deque | None = deque(maxlen=log) if log else None
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer={config.vision_feature_layer!r}: mmprune's methods read one "
                             "feature layer (an int)")
        if "clip" not in getattr(config.vision_config, "model_type", ""):
            raise ValueError(f"mmprune's vLLM plugin serves LLaVA-1.5 with a CLIP tower, not "
                             f"{getattr(config.vision_config, 'model_type', 'this tower')}")
        self.with_cls = config.vision_feature_select_strategy == "full"
        self.side = config.vision_config.image_size // config.vision_config.patch_size
        self.tower_depth = config.vision_config.num_hidden_layers  # transformers' layer numbering
        layers = self.vision_tower.vision_model.encoder.layers  # vLLM stops at the feature layer
        views = [SimpleNamespace(self_attn=_AttentionView(layer.self_attn)) for layer in layers]
        # vLLM's last layer is the feature layer: hidden_states[len(layers)] in transformers' numbering
        self.clip = ClipTower(SimpleNamespace(encoder=SimpleNamespace(layers=views)), len(views))
        fields = set(self.pruner.encoder_fields)
        unavailable = fields & set(LAST_LAYER_FIELDS)
        if unavailable and len(layers) < self.tower_depth:
            raise ValueError(f"{self.pruner.name} reads the last encoder layer ({', '.join(sorted(unavailable))}), "
                             "which vLLM does not run (its tower stops at the feature layer)")
        self.every_layer = bool(fields & set(EVERY_LAYER_FIELDS))
        self.captured: dict = {}
        layers[-1].self_attn.register_forward_pre_hook(capture_input(self, "clip_attn_in"), with_kwargs=True)
        layers[-1].register_forward_hook(capture_output(self, "clip_layer_out"))
        if self.every_layer:
            for i, layer in enumerate(layers):
                layer.self_attn.register_forward_pre_hook(capture_input(self, f"clip_attn_in_{i}"), with_kwargs=True)

    def _process_image_input(self, image_input):
        self.captured = {}
        embeds = super()._process_image_input(image_input)
        if "clip_layer_out" not in self.captured:  # image embeddings given directly: nothing to prune them by
            raise ValueError(f"{plugin.ARCH} prunes images it encodes; it does not accept image_embeds inputs")
        store, self.captured = self.captured, {}
        return [self.prune(embeds[i], i, store) for i in range(len(embeds))]

    def prune(self, embeds: torch.Tensor, i: int, store: dict) -> torch.Tensor:
        """One image's embeddings as they enter the LLM (the method's output, in its order)."""
        item = MediaItem(embeds, image_segments(self.side, self.with_cls), family=plugin.FAMILY,
                         lazy=self._lazy(i, store), project=self.multi_modal_projector)
        selection = self.pruner.prune_image(item)
        out = embeds[selection.slots.to(embeds.device)] if selection.embeds is None else selection.embeds
        if self.mmprune_log is not None:
            self.mmprune_log.append({"kept": selection.kept(), "count": selection.count,
                                     "before": item.num_tokens})
        return out.to(embeds.dtype)

    def _lazy(self, i: int, store: dict) -> dict:
        """The encoder fields of image ``i``, as mmprune's LLaVA adapter offers them (models/llava.py)."""
        first = 0 if self.with_cls else 1
        clip = self.clip

        def tables():
            return once(store, "clip_cls", lambda: clip.cls_attention_and_keys(store))

        def received():
            return once(store, "clip_received", lambda: clip.received_attention_and_keys(store)[0])

        lazy = {
            "token_attention": lambda: tables()[0][i, :, first:],
            "vision_keys": lambda: tables()[1][i, first:],
            "vision_features": lambda: store["clip_layer_out"][i, first:],
            "received_attention": lambda: received()[i, :, first:],
        }
        if not self.with_cls:
            lazy["cls_feature"] = lambda: store["clip_layer_out"][i, 0]
        if self.every_layer:
            lazy["cls_attention_by_layer"] = lambda: PerLayer(self.tower_depth, lambda layer: once(
                store.setdefault("clip_cls_layers", {}), layer,
                lambda: clip.cls_attention_and_keys(store, self._layer(layer))[0])[i, :, first:])
            lazy["received_attention_by_layer"] = lambda: PerLayer(self.tower_depth, lambda layer: once(
                store.setdefault("clip_received_layers", {}), layer,
                lambda: clip.received_attention_and_keys(store, self._layer(layer))[0])[i, :, first:])
        return lazy

    def _layer(self, layer: int) -> int:
        """Encoder ``layer`` (transformers' numbering of the whole tower), which must be one vLLM runs."""
        if layer >= len(self.clip.layers):
            raise ValueError(f"{self.pruner.name} reads encoder layer {layer} of {self.tower_depth}, beyond the "
                             f"feature layer ({len(self.clip.layers) - 1}) where vLLM stops the tower; pass layers "
                             "up to the feature layer")
        return layer

    def get_mm_lora_token_counts(self, *, modality: str, mm_kwargs, num_mm_embeds: int) -> tuple[int, int | None]:
        # one image's counts (num_mm_embeds is its pruned count): the tower and the projector run on all of its
        # tokens, before pruning, as stock vLLM counts them unpruned
        unpruned = self.side * self.side + int(self.with_cls)
        return unpruned, unpruned
