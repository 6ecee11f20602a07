"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``): SigLIP tower
without [CLS] on square tiles -> pixel shuffle -> linear connector -> Llama decoder."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, PerLayer, Segment
from mmprune.models.base import ModelAdapter, capture_input, once
from mmprune.models.internvl import join_tiles

# Optional field read from every encoder layer, captured (every layer's attention input) only for a method that
# lists it in its encoder_fields (HiPrune)
EVERY_LAYER = "received_attention_by_layer"


class Idefics3Adapter(ModelAdapter):
    """Idefics3 and SmolVLM (one layout: SmolVLM is Idefics3's architecture).

    **Images.** The processor resizes an image and, when it exceeds one tile (``max_image_size``), cuts it into
    ``rows x cols`` square tiles and appends the whole image resized to one tile (the *global image*, always last);
    an image that fits is its global image alone. Each tile goes through the SigLIP tower (``P`` patches) and the
    connector's pixel shuffle (scale factor ``s``), so a tile gives ``L = P / s^2`` tokens in a
    ``sqrt(L) x sqrt(L)`` grid, each token holding an ``s x s`` block of patches. In ``input_ids`` every tile is its
    own run of ``L`` image tokens behind two text tokens, ``<fake_token_around_image><row_i_col_j>`` for tile
    ``(i, j)`` and ``<fake_token_around_image><global-img>`` for the global image, which a
    ``<fake_token_around_image>`` closes (SmolVLM2's video frames are such single-tile images). **An image is all
    its tiles plus its global image**: its budget counts all their tokens (as LLaVA-NeXT's crops and InternVL's
    tiles), ``segments`` has one ``sqrt(L) x sqrt(L)`` grid per tile, and ``crop_index`` is 0 for the global image
    and ``1 + j`` for tile ``j`` (processor order, row-major).

    **Which tiles form an image** (the model is not told: ``get_image_features`` returns every real tile of every
    image, and the processor's rows/cols do not reach the model) is read from ``input_ids`` by :meth:`group_items`:
    every run of image tokens must be one tile (``L`` tokens, preceded by ``<fake_token_around_image>`` and a marker
    token); a run whose marker is ``<global-img>`` ends its image. Neither id is in the config; both follow from
    the layout itself: every image ends with its global image, so the token before each sample's last run is
    ``<global-img>`` and the token after it ``<fake_token_around_image>``. A prompt that does not fit (runs that are
    not whole tiles, a run without ``<fake_token_around_image>`` two tokens before it, samples that disagree on
    the two ids, e.g. a tokenizer that splits the marker tokens) is refused.

    **Padding.** ``pixel_values`` are ``(B, tiles, 3, H, W)`` per sample; the model drops the all-zero padding tiles
    before the tower and masks padded patches (``pixel_attention_mask`` -> the tower's ``patch_attention_mask``,
    keys masked in every layer). Items follow the real tiles in the model's order, and the statistics use the mask
    the tower was called with.

    Lazy fields, per tile from the last encoder layer (whose output, post-layernormed, the connector reads), joined
    tile after tile (SigLIP has no [CLS], so, as on Qwen2-VL and LLaVA-OneVision, the substitute is received
    attention):
      * ``token_attention`` and ``received_attention`` ``(heads, N)``: the mean attention each patch receives from
        the tile's real patches, ``softmax(q k^T / sqrt(d_h))`` over the real keys, recomputed from the layer's
        hooked input so the tower keeps its attention implementation, **summed** over each token's ``s^2``
        patches (the mass its patches receive, as InternVL's pixel shuffle); padded patches receive none;
      * ``vision_keys`` ``(N, d_h)``: that layer's keys, averaged over heads and the token's patches;
      * ``vision_features`` ``(N, s^2 C)``: the pixel-shuffled tower output the connector's projection reads
        (``project`` is that projection);
      * ``received_attention_by_layer``: every layer's received attention, per token as above (HiPrune), captured
        only for a method that asks for it;
      * ``crop_index`` (see above). There is no ``cls_feature``.

    Positions: the decoder is Llama with 1-D positions; ``positions="renumber"`` (the default) renumbers kept tokens
    as LLaVA does.
    """

    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    default_positions = "renumber"
    every_layer = False  # whether this attachment captures every encoder layer (install_capture)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.scale = int(self.config.scale_factor)
        self.tower = upstream.idefics3_tower(self.inner)
        self.layers = upstream.clip_encoder_layers(self.tower)
        self._patch_maps: dict[int, torch.Tensor] = {}

    def install_capture(self, extra: tuple[str, ...] = ()) -> list:
        self.every_layer = EVERY_LAYER in extra
        last = len(self.layers) - 1
        captured = range(len(self.layers)) if self.every_layer else (last,)
        handles = [upstream.vision_attention_module(self.layers[i]).register_forward_pre_hook(
            capture_input(self, f"attention_in_{i}"), with_kwargs=True) for i in captured]
        handles.append(self.tower.register_forward_pre_hook(self._capture_patch_mask, with_kwargs=True))
        handles.append(upstream.idefics3_connector(self.inner).register_forward_pre_hook(
            capture_input(self, "connector_in"), with_kwargs=True))
        return handles

    def _capture_patch_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.captured["patch_mask"] = upstream.idefics3_patch_mask(args, kwargs)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return upstream.idefics3_project(self.inner, features)

    # ------------------------------------------------------------------ per tile
    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        """One item per real tile, in the model's order; :meth:`group_items` joins each image's tiles."""
        store = self.captured
        if "connector_in" not in store:
            raise upstream.mismatch("get_image_features runs the connector on the tower's output",
                                    "the connector was not called")
        hidden = store["connector_in"][0]  # (tiles, P, C)
        tiles, patches = int(hidden.shape[0]), int(hidden.shape[1])
        features = upstream.idefics3_tile_features(output, tiles)
        side = math.isqrt(features[0].shape[0])
        if side * side != features[0].shape[0]:
            raise ValueError(f"an Idefics3 tile produced {features[0].shape[0]} features, not a square grid")
        token_patches = self._token_patches(patches)
        if token_patches.shape[0] != side * side:
            raise upstream.mismatch("the connector's pixel shuffle gives one feature per s x s block of patches",
                                    f"{patches} patches gave {token_patches.shape[0]} blocks and "
                                    f"{side * side} features")
        return [MediaItem(embeds, [Segment(0, side, side)], family=self.family,
                          lazy=self._tile_lazy(store, tile, token_patches), project=self.project)
                for tile, embeds in enumerate(features)]

    def _token_patches(self, patches: int) -> torch.Tensor:
        """``(L, s^2)``: the patches (row-major indices in the tile's patch grid) each token holds, an index map
        pushed through the connector's own pixel shuffle, so the layout follows it exactly."""
        if patches not in self._patch_maps:
            grid = torch.arange(patches, dtype=torch.float64).view(1, patches, 1)
            shuffled = upstream.idefics3_pixel_shuffle(self.inner, grid, self.scale)
            self._patch_maps[patches] = shuffled.reshape(shuffled.shape[1], -1).round().long()
        return self._patch_maps[patches]

    def _tile_lazy(self, store: dict, tile: int, index: torch.Tensor) -> dict:
        last = len(self.layers) - 1

        def per_token(received: torch.Tensor) -> torch.Tensor:  # (heads, P) -> (heads, L): sum over its patches
            return received[:, index.to(received.device)].sum(-1)

        def keys() -> torch.Tensor:  # (P, d_h) -> (L, d_h): mean over its patches
            table = self._received(store, last)[1][tile]
            return table[index.to(table.device)].mean(1)

        def shuffled() -> torch.Tensor:  # what the connector's projection reads: (L, s^2 C)
            hidden = store["connector_in"][0][tile:tile + 1]
            return upstream.idefics3_pixel_shuffle(self.inner, hidden, self.scale)[0]

        attention = lambda: per_token(self._received(store, last)[0][tile])  # noqa: E731
        lazy = {"token_attention": attention, "received_attention": attention, "vision_keys": keys,
                "vision_features": shuffled}
        if self.every_layer:
            lazy[EVERY_LAYER] = lambda: PerLayer(
                len(self.layers), lambda layer: per_token(self._received(store, layer)[0][tile]))
        return lazy

    def _received(self, store: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tiles, heads, P)`` attention each patch receives at encoder ``layer`` (mean over the tile's real
        queries, softmax over its real keys) and ``(tiles, P, d_h)`` head-mean keys, computed once per forward."""
        return once(store.setdefault("received", {}), layer, lambda: self._received_now(store, layer))

    def _received_now(self, store: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = store[f"attention_in_{layer}"]
        attn = upstream.clip_attention(self.layers[layer])
        tiles, length, _ = hidden.shape
        mask = store.get("patch_mask")
        real = (mask.reshape(tiles, length).to(hidden.device).bool() if mask is not None
                else torch.ones(tiles, length, dtype=torch.bool, device=hidden.device))
        received = torch.zeros(tiles, attn.num_heads, length, dtype=torch.float32, device=hidden.device)
        keys = torch.empty(tiles, length, attn.head_dim, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for tile in range(tiles):  # one tile at a time bounds the (heads, P, P) buffer
                q, k = attn.queries_keys(hidden[tile], hidden[tile])
                q = q.view(length, attn.num_heads, attn.head_dim).transpose(0, 1).float()
                k = k.view(length, attn.num_heads, attn.head_dim).transpose(0, 1).float()
                logits = (q @ k.transpose(-1, -2)) * attn.scale
                probs = logits.masked_fill(~real[tile], float("-inf")).softmax(dim=-1)
                queries = real[tile].float()
                received[tile] = (probs * queries[:, None]).sum(dim=1) / queries.sum()
                keys[tile] = k.mean(dim=0)
        return received, keys

    # ------------------------------------------------------------------ per image
    def group_items(self, items: list[MediaItem], input_ids: torch.Tensor) -> list[MediaItem]:
        """Join each image's tiles (its split tiles, then its global image) into one item, in the order the model
        scatters them (row-major over ``input_ids``)."""
        tiles = [item for item in items if item.modality == "image"]
        if not tiles:
            return items
        counts = self.tiles_per_image(input_ids, tiles[0].num_tokens)
        if sum(counts) != len(tiles):
            raise ValueError(f"input_ids lay out {sum(counts)} Idefics3 tiles but the images produced {len(tiles)}")
        side = tiles[0].segments[0].rows
        images, start = [], 0
        for count in counts:
            images.append(join_tiles(tiles[start:start + count], side, self.family, self.project))
            start += count
        return images + [item for item in items if item.modality != "image"]

    def tiles_per_image(self, input_ids: torch.Tensor, per_tile: int) -> list[int]:
        """How many tiles (global image included) each image has, images in row-major order of ``input_ids``, by
        the rule in the class docstring."""
        layout = ("each tile must be one run of {n} image tokens behind <fake_token_around_image> and its marker "
                  "(<row_i_col_j> or <global-img>), each image ending with its global image and "
                  "<fake_token_around_image>, as the Idefics3 / SmolVLM processors lay them out").format(n=per_tile)
        ids = input_ids.cpu()
        runs = []  # per sample, its (start, end) runs of image tokens
        for row in ids:
            edges = torch.diff((row == self.image_token_id).to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                               append=torch.zeros(1, dtype=torch.int8))
            runs.append(list(zip((edges == 1).nonzero().squeeze(1).tolist(),
                                 (edges == -1).nonzero().squeeze(1).tolist())))
        closing = set()  # (<global-img>, <fake_token_around_image>) as each sample's last run shows them
        for row, spans in zip(ids, runs):
            for start, end in spans:
                if end - start != per_tile or start < 2:
                    raise ValueError(f"input_ids hold a run of {end - start} image tokens at position {start}; "
                                     + layout)
            if spans:
                start, end = spans[-1]
                if end >= row.numel():
                    raise ValueError("input_ids end with image tokens; " + layout)
                closing.add((int(row[start - 1]), int(row[end])))
        if len(closing) != 1 or len(set(next(iter(closing)))) != 2:
            raise ValueError(f"the tokens around the samples' last image-token runs disagree ({sorted(closing)} as "
                             "(<global-img>, <fake_token_around_image>)); " + layout)
        global_image, fake = next(iter(closing))
        counts = []
        for row, spans in zip(ids, runs):
            tiles = 0
            for start, end in spans:
                if int(row[start - 2]) != fake:
                    raise ValueError(f"the image tokens at position {start} do not follow "
                                     f"<fake_token_around_image> (id {fake}) and a marker token; " + layout)
                tiles += 1
                if int(row[start - 1]) == global_image:
                    if int(row[end]) != fake:
                        raise ValueError(f"the global image ending at position {end} is not closed by "
                                         f"<fake_token_around_image> (id {fake}); " + layout)
                    counts.append(tiles)
                    tiles = 0
        return counts
