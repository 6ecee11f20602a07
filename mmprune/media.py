"""The shared vocabulary of media tokens: items, their grids (segments), and a method's answer (selections).

``MediaItem`` is the model-independent view of one image's, video's or audio clip's tokens as they enter the LLM.
The model adapter fills it; methods read only the fields they need. A video is a sequence of temporal grids, one
:class:`Segment` per grid, each with its index and time in seconds; an audio clip is one ``1 x N`` segment of
tokens in time order. Attention-derived fields are computed lazily
(a method that never asks for [CLS] attention never pays for it).

``Selection`` is a method's answer: which original token slots survive, in the order the tokens enter the LLM, and
optionally new embeddings for them (merging methods such as VisionZip and pooling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Lazy = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """A run of an image's visual tokens laid out as a row-major ``rows x cols`` grid of patches.

    ``newline`` marks LLaVA-NeXT's layout, where each row of the grid is followed by one image-newline token, so
    the segment holds ``rows * (cols + 1)`` tokens.
    """

    start: int
    rows: int
    cols: int
    newline: bool = False
    frame: int | None = None  # a video's temporal grid index (None for images)
    time: float | None = None  # seconds from the start of the video at which the grid begins

    @property
    def size(self) -> int:
        return self.rows * (self.cols + int(self.newline))

    def patch_indices(self) -> torch.Tensor:
        """Image-level token indices of the patches (not the newlines), as a ``rows x cols`` grid."""
        stride = self.cols + int(self.newline)
        r = torch.arange(self.rows).unsqueeze(1) * stride
        c = torch.arange(self.cols).unsqueeze(0)
        return self.start + r + c

    def newline_indices(self) -> torch.Tensor:
        if not self.newline:
            return torch.empty(0, dtype=torch.long)
        return self.start + torch.arange(self.rows) * (self.cols + 1) + self.cols


MODALITIES = ("image", "video", "audio")


class PerLayer:
    """An encoder statistic of every layer, each layer computed on first access and kept: a method that reads two
    layers of 24 pays for two. Indexed like a ``(layers, ...)`` tensor (``table[i]``, ``len(table)``)."""

    def __init__(self, depth: int, compute: Callable[[int], torch.Tensor]) -> None:
        self.depth = depth
        self._compute = compute
        self._layers: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.depth

    def __getitem__(self, layer: int) -> torch.Tensor:
        layer = range(self.depth)[layer]  # negative indices as for a tensor; IndexError beyond the tower
        if layer not in self._layers:
            self._layers[layer] = self._compute(layer)
        return self._layers[layer]

    def stack(self) -> torch.Tensor:
        """Every layer, ``(layers, ...)``."""
        return torch.stack([self[i] for i in range(self.depth)])


class MediaItem:
    """One image's or video's tokens as the LLM would receive them, plus what the vision encoder knows about them.

    Attributes:
        embeds: ``(N, D)`` projected embeddings, the LLM input for this item.
        segments: the layout of the tokens (one grid for LLaVA-1.5 and Qwen2-VL images; base grid + high-res grid
            with newline tokens for LLaVA-NeXT; one grid per temporal step for videos, with ``frame`` and
            ``time``). Every token index in ``range(N)`` belongs to exactly one segment.
        modality: ``"image"``, ``"video"`` or ``"audio"`` (one ``1 x N`` segment: its tokens in time order).
        token_seconds: an audio item's seconds per token (0.04 on Qwen2.5-Omni), None when unknown.
        sample: index of the sample (row of the batch) the item belongs to.
        index_in_sample: index of this item among the items of its modality in its sample (0 for the first).
        family: the adapter's family name, for methods whose reference treats families differently.
        prompt: the sample's text (:class:`~mmprune.prompt.PromptText`) for a method that ``reads_prompt``;
            ``None`` for the others.
    """

    def __init__(
        self,
        embeds: torch.Tensor,
        segments: list[Segment],
        *,
        modality: str = "image",
        sample: int = 0,
        index_in_sample: int = 0,
        family: str = "",
        lazy: dict[str, Lazy] | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
        token_seconds: float | None = None,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality {modality!r}: expected one of {MODALITIES}")
        self.embeds = embeds
        self.segments = segments
        self.modality = modality
        self.sample = sample
        self.index_in_sample = index_in_sample
        self.family = family
        self._lazy = dict(lazy or {})
        self._cache: dict[str, torch.Tensor] = {}
        self._project = project
        self.token_seconds = token_seconds
        self.prompt = None  # set by the engine for methods that read the prompt
        if sum(s.size for s in segments) != embeds.shape[0]:
            raise ValueError(
                f"segments cover {sum(s.size for s in segments)} tokens but the image has {embeds.shape[0]}"
            )

    @property
    def num_tokens(self) -> int:
        return self.embeds.shape[0]

    @property
    def frames(self) -> list[Segment]:
        """A video's temporal grids in order (empty for an image)."""
        return [s for s in self.segments if s.frame is not None]

    def frame_indices(self) -> torch.Tensor:
        """``(T, N)`` token indices of a video's temporal grids (frame ``t``'s patches in raster order)."""
        return torch.stack([s.patch_indices().reshape(-1) for s in self.frames]).to(self.embeds.device)

    def patch_indices(self) -> torch.Tensor:
        """Indices of the item's patch tokens (every token but LLaVA-NeXT / OneVision newline tokens), ascending."""
        keep = torch.ones(self.num_tokens, dtype=torch.bool, device=self.embeds.device)
        for segment in self.segments:
            keep[segment.newline_indices().to(keep.device)] = False
        return keep.nonzero().squeeze(1)

    def other_indices(self) -> torch.Tensor:
        """Indices of the tokens outside every temporal grid (LLaVA-OneVision's trailing newline of a video)."""
        inside = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.embeds.device)
        for segment in self.frames:
            inside[segment.patch_indices().reshape(-1).to(inside.device)] = True
        return torch.nonzero(~inside).reshape(-1)

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` when the image is one plain grid (LLaVA-1.5, Qwen2-VL), else ``None``."""
        if len(self.segments) == 1 and not self.segments[0].newline:
            return self.segments[0].rows, self.segments[0].cols
        return None

    def has(self, name: str) -> bool:
        return name in self._lazy

    def get(self, name: str) -> torch.Tensor:
        """A lazily computed encoder-side tensor, e.g. ``"token_attention"``; see the adapters for what exists."""
        if name not in self._cache:
            if name not in self._lazy:
                raise KeyError(
                    f"this model family ({self.family}) does not provide {name!r}; it provides {sorted(self._lazy)}"
                )
            self._cache[name] = self._lazy[name]()
        return self._cache[name]

    @property
    def token_attention(self) -> torch.Tensor:
        """``(heads, N)`` attention each visual token receives in the vision encoder, per head.

        For CLIP towers (LLaVA) this is the [CLS] query's attention row at the feature layer; for towers without
        [CLS] (Qwen2-VL) the adapter documents its substitute.
        """
        return self.get("token_attention")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map vision-encoder features (pre-projector) to LLM embeddings with the model's own projector."""
        if self._project is None:
            raise KeyError(f"this model family ({self.family}) does not expose its projector to methods")
        return self._project(features)


@dataclass
class Selection:
    """A method's answer for one image.

    Attributes:
        slots: ``(k,)`` long tensor; output token ``j`` takes the place (and, under ``positions="original"``, the
            position id) of original visual token ``slots[j]``. Output tokens enter the LLM in this order.
        embeds: optional ``(k, D)`` embeddings for the output tokens. ``None`` means each output token is the
            original token at its slot, unchanged (pure selection).
        merged: how many output tokens carry new (merged or pooled) content rather than an original token.
    """

    slots: torch.Tensor
    embeds: torch.Tensor | None = None
    merged: int = 0
    note: str | None = None  # how the method departed from the budget it was given, recorded in stats

    @property
    def count(self) -> int:
        return int(self.slots.numel())

    def kept(self) -> list[int]:
        """Original token indices whose slot survives, ascending."""
        return sorted(set(self.slots.tolist()))

    def is_identity(self, num_tokens: int) -> bool:
        """Whether this keeps all ``num_tokens`` tokens, unchanged and in order."""
        return (self.embeds is None and self.count == num_tokens
                and bool((self.slots.cpu() == torch.arange(num_tokens)).all()))

    @staticmethod
    def identity(num_tokens: int, device: torch.device | None = None) -> "Selection":
        return Selection(slots=torch.arange(num_tokens, device=device))

    @staticmethod
    def of(indices: torch.Tensor) -> "Selection":
        """A pure selection of ``indices``, put in original order (every reference re-sorts its top-k)."""
        return Selection(slots=torch.sort(indices.reshape(-1)).values)
