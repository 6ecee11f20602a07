"""InternVL3 (``InternVLForConditionalGeneration``): InternViT with [CLS] -> pixel shuffle -> MLP -> Qwen2 decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem, PerLayer, Segment
from mmprune.models.base import ModelAdapter
from mmprune.models.llava import EVERY_LAYER_FIELDS, ClipTower, LlavaAdapter

# Per-tile lazy fields and the axis along which a multi-tile image concatenates them (its tokens, tile after tile)
TILE_AXES = {"token_attention": -1, "received_attention": -1, "vision_keys": 0, "vision_features": 0,
             "last_layer_cls_attention": 0, "last_layer_keys": 0}


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class InternVLAdapter(LlavaAdapter):
    """InternVL3. The processor cuts an image into up to 12 448-px tiles plus a thumbnail (the whole image at 448 px,
    last), each tile 32 x 32 InternViT patches, which the model's pixel shuffle turns into 16 x 16 tokens (each token
    holds a 2 x 2 block of patches); an image's tokens are one run of ``<IMG_CONTEXT>`` between ``<img>`` and
    ``</img>``, tile after tile. **An image is that run**: its budget counts all its tiles' tokens (as for
    LLaVA-NeXT's crops), and ``segments`` has one 16 x 16 grid per tile. The tiles of an image are found from the
    runs in ``input_ids`` (the model is not told which tiles belong together).

    Encoder statistics, per tile, from its own [CLS] query (InternViT keeps [CLS]; the ``default`` strategy drops it
    from the features): a token's [CLS] (or received) attention is the **sum** over its four patches (the mass its
    patches receive), its key the mean of theirs, its ``vision_features`` the pixel-shuffled vector the projector
    reads. There is no ``cls_feature``: the projector reads pixel-shuffled groups of four patches, which a lone [CLS]
    is not (VisionZip adds no [CLS] token here, SMS compares with the mean token). ``crop_index`` is 0
    for the thumbnail and ``1 + j`` for tile ``j``, as LLaVA-NeXT's base image and sub-images. Videos reach InternVL
    as frames encoded like images, each frame its own run: they are pruned frame by frame as images.
    """

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    default_positions = "renumber"

    def __init__(self, model: nn.Module) -> None:
        ModelAdapter.__init__(self, model)
        self.feature_layer = self.config.vision_feature_layer
        self.strategy = self.config.vision_feature_select_strategy
        vision = self.config.vision_config
        size, patch = _pair(vision.image_size), _pair(vision.patch_size)
        self.patch_side = size[0] // patch[0]
        self.ratio = float(self.config.downsample_ratio)
        # the four patches (row-major indices in the tile's patch grid) that each token holds: an index map pushed
        # through the model's own pixel shuffle, so the layout follows it exactly
        grid = torch.arange(self.patch_side ** 2, dtype=torch.float64).view(1, self.patch_side, self.patch_side, 1)
        shuffled = upstream.internvl_pixel_shuffle(self.inner, grid, self.ratio)
        self.side = int(shuffled.shape[1])
        self.token_patches = shuffled.reshape(self.side * self.side, -1).round().long()
        self.clip = ClipTower(self.inner.vision_tower, self.feature_layer) if isinstance(self.feature_layer, int) \
            else None
        if self.strategy != "default":
            raise ValueError(f"InternVL with vision_feature_select_strategy={self.strategy!r}: mmprune supports "
                             "'default' (the [CLS] token dropped from the features, as every InternVL checkpoint)")

    # ------------------------------------------------------------------ per tile
    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        """One item per tile; :meth:`group_items` joins each image's tiles once ``input_ids`` are known."""
        tiles = []
        for tile, embeds in enumerate(upstream.image_features(output)):
            if embeds.shape[0] != self.side * self.side:
                raise ValueError(f"an InternVL tile produced {embeds.shape[0]} features, expected "
                                 f"{self.side * self.side} ({self.side} x {self.side} after the pixel shuffle)")
            tiles.append(MediaItem(embeds, [Segment(0, self.side, self.side)], family=self.family,
                                   lazy=self._tile_lazy(tile), project=self.project))
        return tiles

    def _tile_lazy(self, tile: int) -> dict:
        if self.clip is None:
            return {}
        store = self.captured
        index = self.token_patches

        def attention(table: torch.Tensor) -> torch.Tensor:  # (heads, 1+P) -> (heads, T): sum of the 4 patches
            return table[:, 1:][:, index.to(table.device)].sum(-1)

        def per_token_rows(table: torch.Tensor) -> torch.Tensor:  # (1+P, d) -> (T, d): mean of the 4 patches
            return table[1:][index.to(table.device)].mean(1)

        def shuffled() -> torch.Tensor:  # what the projector reads: (T, 4 C)
            patches = store["clip_layer_out"][tile:tile + 1, 1:]
            grid = patches.reshape(1, self.patch_side, self.patch_side, -1)
            out = upstream.internvl_pixel_shuffle(self.inner, grid, self.ratio)
            return out.reshape(-1, out.shape[-1])

        lazy = {
            "token_attention": lambda: attention(self.clip_tables(store)[0][tile]),
            "vision_keys": lambda: per_token_rows(self.clip_tables(store)[1][tile]),
            "vision_features": shuffled,
            "received_attention": lambda: attention(self.clip_received(store)[tile]),
        }
        if self.every_layer:
            lazy["cls_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: attention(self.clip_layer_rows(store, layer)[tile]))
            lazy["received_attention_by_layer"] = lambda: PerLayer(
                len(self.clip.layers), lambda layer: attention(self.clip_received_layer(store, layer)[tile]))
        if self.last_layer:
            lazy["last_layer_cls_attention"] = lambda: self.clip_last_tables(store)[0][tile, 1:][
                index.to(store["clip_last_attn_in"][0].device)].sum(-1)
            lazy["last_layer_keys"] = lambda: per_token_rows(self.clip_last_tables(store)[1][tile])
        return lazy

    # ------------------------------------------------------------------ per image
    def group_items(self, items: list[MediaItem], input_ids: torch.Tensor) -> list[MediaItem]:
        """Join consecutive tiles into one item per run of image tokens in ``input_ids`` (row-major order, the
        order the model scatters the tiles' features in)."""
        tiles = [item for item in items if item.modality == "image"]
        if not tiles:
            return items
        per_tile = self.side * self.side
        runs = []
        for row in (input_ids == self.image_token_id).cpu():
            edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), row.to(torch.int8),
                                          torch.zeros(1, dtype=torch.int8)]))
            starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
            runs += (ends - starts).tolist()
        if any(run % per_tile for run in runs) or sum(runs) != per_tile * len(tiles):
            raise ValueError(f"input_ids hold image-token runs of {runs} tokens but the images produced {len(tiles)} "
                             f"tiles of {per_tile} tokens; each image's tokens must be one run of whole tiles")
        images, start = [], 0
        for run in runs:
            count = run // per_tile
            images.append(self._join(tiles[start:start + count]))
            start += count
        return images + [item for item in items if item.modality != "image"]  # modality order, as items came

    def _join(self, tiles: list[MediaItem]) -> MediaItem:
        return join_tiles(tiles, self.side, self.family, self.project)


def join_tiles(tiles: list[MediaItem], side: int, family: str, project: Any) -> MediaItem:
    """One item of an image's tiles (each a ``side x side`` grid, the whole-image tile last): their tokens tile
    after tile, one segment per tile, the per-tile lazy fields joined along their token axis, and ``crop_index``."""
    if len(tiles) == 1:
        tiles[0]._lazy["crop_index"] = lambda: torch.zeros(tiles[0].num_tokens, dtype=torch.long)
        return tiles[0]
    per_tile = tiles[0].num_tokens
    lazy: dict = {}
    for name in set.intersection(*(set(tile._lazy) for tile in tiles)):
        if name in TILE_AXES:
            lazy[name] = (lambda n: lambda: torch.cat([tile.get(n) for tile in tiles], dim=TILE_AXES[n]))(name)
        elif name in EVERY_LAYER_FIELDS:
            lazy[name] = (lambda n: lambda: PerLayer(len(tiles[0].get(n)), lambda layer: torch.cat(
                [tile.get(n)[layer] for tile in tiles], dim=-1)))(name)
    # 0: the whole image (last tile), 1 + j: tile j, as LLaVA-NeXT's base image and sub-images
    lazy["crop_index"] = lambda: torch.cat([torch.full((per_tile,), 1 + j) for j in range(len(tiles) - 1)]
                                           + [torch.zeros(per_tile, dtype=torch.long)])
    segments = [Segment(j * per_tile, side, side) for j in range(len(tiles))]
    return MediaItem(torch.cat([tile.embeds for tile in tiles]), segments, family=family, lazy=lazy, project=project)
