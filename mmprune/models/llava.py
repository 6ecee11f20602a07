"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with [CLS] -> MLP projector -> Llama-style decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, PerLayer, Segment
from mmprune.models.base import ModelAdapter, capture_input, capture_output, once
from mmprune.models.clip_pruning import ClipEncoderPruning


# Optional fields read from the last encoder layer (LLaVA-PruMerge), captured only for methods that list one in
# their encoder_fields: ``last_layer_cls_attention`` (N,) and ``last_layer_keys`` (N, D), see
# ClipTower.last_layer_cls_attention_and_keys.
LAST_LAYER_FIELDS = ("last_layer_cls_attention", "last_layer_keys")
# Optional fields read from every encoder layer, captured (every layer's attention input) only for methods that list
# one: ``cls_attention_by_layer`` [CLS] rows (VTC-CLS, HiRED) and ``received_attention_by_layer`` the attention each
# token receives, mean over its crop's queries (HiPrune); each a PerLayer table of (heads, N), a layer computed when
# read.
EVERY_LAYER_FIELDS = ("cls_attention_by_layer", "received_attention_by_layer")


class ClipTower:
    """[CLS] attention, keys and hidden states of one CLIP layer, recomputed from hooked inputs.

    The tower keeps its own attention implementation (SDPA or FlashAttention): we hook the input of the layer's
    ``self_attn`` and recompute the [CLS] query row ``softmax(q_cls k^T / sqrt(d_h))`` per head, which equals row 0
    of that layer's attention probabilities (``attentions[layer]`` under eager attention).
    """

    def __init__(self, tower: nn.Module, feature_layer: int) -> None:
        layers = upstream.clip_encoder_layers(tower)
        if not isinstance(feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={feature_layer!r}: attention-based methods need a single feature layer (int)"
            )
        count = len(layers)
        # hidden_states[f] is the output of layer f-1 (f > 0) or of layer count+f (f < 0); attentions[] likewise.
        index = feature_layer - 1 if feature_layer > 0 else count + feature_layer
        if not 0 <= index < count:
            raise ValueError(
                f"vision_feature_layer={feature_layer} selects no encoder layer of a {count}-layer tower "
                f"(hidden_states[0] are the embeddings): expected 1..{count} or -{count}..-1"
            )
        self.layers = layers
        self.layer = layers[index]
        self.attention = upstream.vision_attention_module(self.layer)  # hooked for its input (fields: upstream)

    def install(self, adapter: ModelAdapter, every_layer: bool = False, last_layer: bool = False) -> list:
        """Hooks on the feature layer; with ``every_layer`` also on every layer's attention input (which keeps
        them all alive until the next encoder call), for methods that read several layers (VTC-CLS); with
        ``last_layer`` on the last layer's attention input (PruMerge)."""
        handles = [
            self.attention.register_forward_pre_hook(capture_input(adapter, "clip_attn_in"), with_kwargs=True),
            self.layer.register_forward_hook(capture_output(adapter, "clip_layer_out")),
        ]
        if every_layer:
            handles += [upstream.vision_attention_module(layer).register_forward_pre_hook(
                capture_input(adapter, f"clip_attn_in_{i}"), with_kwargs=True)
                        for i, layer in enumerate(self.layers)]
        if last_layer:
            handles.append(upstream.vision_attention_module(self.layers[-1]).register_forward_pre_hook(
                capture_input(adapter, "clip_last_attn_in"), with_kwargs=True))
        return handles

    def last_layer_cls_attention_and_keys(self, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, 1+N) [CLS]-row attention of the **last** encoder layer taken single-headed over the full width,
        ``softmax(q_cls k^T / sqrt(D))`` with the full-width ``q_proj`` / ``k_proj`` outputs (biases included,
        heads not split), as LLaVA-PruMerge's code computes it from hooked ``q_proj`` / ``k_proj``; and (crops,
        1+N, D) those full-width keys."""
        hidden, _ = store["clip_last_attn_in"]
        attn = upstream.clip_attention(self.layers[-1])
        with torch.no_grad():
            q, k = attn.queries_keys(hidden[:, :1], hidden)
            q, k = q.float(), k.float()
            probs = ((q @ k.transpose(-1, -2)).squeeze(1) * k.shape[-1] ** -0.5).softmax(dim=-1)
        return probs, k

    def cls_attention_and_keys(self, store: dict, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, heads, 1+N) [CLS]-row probabilities and (crops, 1+N, d_h) head-mean keys of the feature layer (or
        of encoder ``layer``)."""
        hidden, _ = store["clip_attn_in" if layer is None else f"clip_attn_in_{layer}"]
        attn = upstream.clip_attention(self.layer if layer is None else self.layers[layer])
        heads, head_dim = attn.num_heads, attn.head_dim
        crops, length, _ = hidden.shape
        with torch.no_grad():
            q, k = attn.queries_keys(hidden[:, :1], hidden)
            q = q.view(crops, 1, heads, head_dim).transpose(1, 2)
            k = k.view(crops, length, heads, head_dim).transpose(1, 2)
            logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scale
            probs = logits.softmax(dim=-1)
        return probs, k.float().mean(dim=1)

    def received_attention_and_keys(self, store: dict,
                                    layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, heads, L) mean attention each token receives from every query of its crop, and (crops, L, d_h)
        head-mean keys, of the feature layer (or of encoder ``layer``): the substitute for [CLS] attention on towers
        without one (SigLIP), as for Qwen2-VL."""
        hidden, _ = store["clip_attn_in" if layer is None else f"clip_attn_in_{layer}"]
        attn = upstream.clip_attention(self.layer if layer is None else self.layers[layer])
        heads, head_dim = attn.num_heads, attn.head_dim
        crops, length, _ = hidden.shape
        received = torch.zeros(crops, heads, length, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            k = attn.k_norm(attn.k_proj(hidden)).view(crops, length, heads, head_dim).transpose(1, 2).float()
            for crop in range(crops):  # one crop at a time bounds the (heads, L, L) buffer
                q = attn.q_norm(attn.q_proj(hidden[crop])).view(length, heads, head_dim).transpose(0, 1).float()
                probs = (q @ k[crop].transpose(-1, -2) * attn.scale).softmax(dim=-1)
                received[crop] = probs.mean(dim=1)
        return received, k.mean(dim=1)


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5. The visual tokens of an image are its grid of patches (plus [CLS] under ``full`` selection)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    default_positions = "renumber"
    layer_rows = True  # the tower has [CLS], so every layer's [CLS] row can be offered (EVERY_LAYER_FIELDS)
    every_layer = False  # whether this attachment captures every layer (install_capture)
    last_layer = False  # whether it captures the last layer's input (LAST_LAYER_FIELDS)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.feature_layer = self.config.vision_feature_layer
        self.strategy = self.config.vision_feature_select_strategy
        vision = self.config.vision_config
        self.side = vision.image_size // vision.patch_size
        self.clip: ClipTower | None = None
        if isinstance(self.feature_layer, int) and upstream.has_clip_encoder(self.inner.vision_tower):
            self.clip = ClipTower(self.inner.vision_tower, self.feature_layer)

    def install_capture(self, extra: tuple[str, ...] = ()) -> list:
        if self.clip is None:
            return []
        self.every_layer = self.layer_rows and any(name in extra for name in EVERY_LAYER_FIELDS)
        self.last_layer = self.layer_rows and any(name in extra for name in LAST_LAYER_FIELDS)
        return self.clip.install(self, every_layer=self.every_layer, last_layer=self.last_layer)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.multi_modal_projector(features)

    def install_encoder_pruning(self, pruner: Any) -> list:
        """FlowCut: hooks that shorten the CLIP tower's sequence between its layers (models/clip_pruning.py)."""
        if self.family != "llava":  # LLaVA-NeXT packs its crops after the tower: not supported
            return super().install_encoder_pruning(pruner)
        if self.clip is None:
            raise ValueError(f"{pruner.name} needs a CLIP tower and one integer vision_feature_layer; this model has "
                             f"vision_feature_layer={self.feature_layer!r}")
        tower_type = getattr(self.config.vision_config, "model_type", "")
        if "clip" not in tower_type:  # SigLIP & co.: token 0 is a patch, there is no [CLS] to score with
            raise ValueError(f"{pruner.name} scores tokens through the tower's [CLS] token, and this model's "
                             f"{tower_type or 'vision'} tower has none")
        index = next(i for i, layer in enumerate(self.clip.layers) if layer is self.clip.layer)
        if index < 1:
            raise ValueError(f"{pruner.name} prunes at the encoder layers before the feature layer, and "
                             f"vision_feature_layer={self.feature_layer!r} selects encoder layer 0 (none before it)")
        pruning = ClipEncoderPruning(self, pruner, self.inner.vision_tower, index, with_cls=self.strategy == "full")
        return pruning.install()

    def restore_pruned(self, modality: str, output: Any) -> Any:
        """Each image's features of the patches that reached the feature layer (``captured["encoder_kept"]``) back
        at their slots, zeros at the pruned ones (never selected: the method keeps exactly the encoder's set)."""
        kept = self.captured.get("encoder_kept")
        if modality != "image" or kept is None:
            return output
        features = upstream.image_features(output)
        first = int(self.strategy == "full")  # [CLS] is token 0 of the image and always stays
        n = self.side * self.side + first
        if len(features) != len(kept):
            raise ValueError(f"the tower encoded {len(kept)} images but get_image_features returned {len(features)}")
        restored, slots = [], []
        for feature, patches in zip(features, kept):
            index = torch.cat([patches.new_zeros(first), patches + first]).to(feature.device)
            if feature.shape[0] != index.numel():
                raise ValueError(f"an image has {feature.shape[0]} features but {index.numel()} tokens reached the "
                                 "feature layer (a vision_feature_layer other than the config's?)")
            slots.append(index)
            full = feature
            if index.numel() < n:
                full = feature.new_zeros(n, feature.shape[-1])
                full[index] = feature
            restored.append(full)
        if any(index.numel() < n for index in slots):
            upstream.set_image_features(output, restored)
        self.captured["encoder_item_kept"] = slots
        return output

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        features = upstream.image_features(output)
        with_cls = self.strategy == "full"
        images = []
        for i, embeds in enumerate(features):
            segments = [Segment(start=int(with_cls), rows=self.side, cols=self.side)]
            if with_cls:  # [CLS] is token 0 of the image; it is its own 1x1 "grid"
                segments.insert(0, Segment(start=0, rows=1, cols=1))
            images.append(MediaItem(embeds, segments, family=self.family, lazy=self._lazy(i, with_cls),
                                       project=self.project))
        return images

    def clip_tables(self, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, heads, 1+N) [CLS] rows and (crops, 1+N, d_h) keys of this forward, computed once."""
        return once(store, "clip_cls", lambda: self.clip.cls_attention_and_keys(store))

    def clip_layer_rows(self, store: dict, layer: int) -> torch.Tensor:
        """(crops, heads, 1+N) [CLS] rows of encoder ``layer`` in this forward, computed once and only for the layers
        a method reads (``cls_attention_by_layer``: VTC-CLS reads layers start..L-2, HiRED two)."""
        return once(store.setdefault("clip_cls_layers", {}), layer,
                    lambda: self.clip.cls_attention_and_keys(store, layer)[0])

    def clip_received_layer(self, store: dict, layer: int) -> torch.Tensor:
        """(crops, heads, 1+N) received attention of encoder ``layer`` in this forward, computed once and only for
        the layers a method reads (``received_attention_by_layer``: HiPrune reads one of them)."""
        return once(store.setdefault("clip_received_layers", {}), layer,
                    lambda: self.clip.received_attention_and_keys(store, layer)[0])

    def clip_last_tables(self, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(crops, 1+N) last-layer single-headed [CLS] rows and (crops, 1+N, D) full-width keys, computed once."""
        return once(store, "clip_last", lambda: self.clip.last_layer_cls_attention_and_keys(store))

    def clip_received(self, store: dict) -> torch.Tensor:
        """(crops, heads, 1+N) attention each token receives at the feature layer (mean over its crop's queries),
        computed once, only when a method reads ``received_attention`` (FoPru)."""
        return once(store, "clip_received", lambda: self.clip.received_attention_and_keys(store)[0])

    def _lazy(self, i: int, with_cls: bool) -> dict:
        if self.clip is None:
            return {}
        store = self.captured
        first = 0 if with_cls else 1

        lazy = {
            "token_attention": lambda: self.clip_tables(store)[0][i, :, first:],
            "vision_keys": lambda: self.clip_tables(store)[1][i, first:],
            "vision_features": lambda: store["clip_layer_out"][i, first:],
            "received_attention": lambda: self.clip_received(store)[i, :, first:],
        }
        if not with_cls:
            lazy["cls_feature"] = lambda: store["clip_layer_out"][i, 0]
        if "encoder_item_kept" in store:  # in-tower pruning (FlowCut): what reached the feature layer
            lazy["encoder_kept"] = lambda: store["encoder_item_kept"][i]
            lazy["encoder_tokens_per_layer"] = lambda: store["encoder_counts"][i]
        if self.every_layer:
            lazy["cls_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: self.clip_layer_rows(store, layer)[i, :, first:])
            lazy["received_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: self.clip_received_layer(store, layer)[i, :, first:])
        if self.last_layer:
            lazy["last_layer_cls_attention"] = lambda: self.clip_last_tables(store)[0][i, first:]
            lazy["last_layer_keys"] = lambda: self.clip_last_tables(store)[1][i, first:]
        return lazy
