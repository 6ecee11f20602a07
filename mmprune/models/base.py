"""What an adapter tells the engine about one model family."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mmprune import upstream
from mmprune.media import MediaItem


class ModelAdapter:
    """One model family: where its image tokens are, what its vision encoder can say about them.

    Subclasses set ``family``, ``default_positions`` and ``supports_renumber`` and implement
    :meth:`install_capture` and :meth:`build_images`.
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("image",)  # input modalities whose tokens the engine prunes; others are refused
    default_positions: str = "renumber"
    supports_renumber: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner: nn.Module = model.model
        self.language_model: nn.Module = upstream.multimodal_decoder(self.inner)
        self.config = model.config
        self.image_token_id: int = int(self.config.image_token_id)
        # What the capture hooks saw during the current forward; cleared at each forward start.
        self.captured: dict[str, Any] = {}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    @property
    def num_layers(self) -> int:
        return len(upstream.decoder_layers(self.language_model))

    def token_id(self, modality: str) -> int:
        """The placeholder token id of ``modality`` in ``input_ids``."""
        return self.image_token_id if modality == "image" else int(getattr(self.config, f"{modality}_token_id"))

    def build_items(self, modality: str, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        """One ``MediaItem`` per image or video that ``get_<modality>_features(*args, **kwargs)`` encoded."""
        if modality == "image":
            return self.build_images(output, args, kwargs)
        return self.build_videos(output, args, kwargs)

    def build_videos(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:  # pragma: no cover
        raise NotImplementedError

    def group_items(self, items: list[MediaItem], input_ids: torch.Tensor) -> list[MediaItem]:
        """The items as the budget counts them, once ``input_ids`` are known (InternVL joins an image's tiles)."""
        return items

    def annotate(self, items: list[MediaItem], arguments: dict) -> None:
        """Fill what only the multimodal forward's arguments tell (e.g. a video's seconds per grid)."""

    # decoder layers that receive per-layer visual features at visual positions (DeepStack); no stage may drop
    # tokens before the last of them
    deepstack_layers: int = 0

    def compact_language_model_kwargs(self, kwargs: dict, source: torch.Tensor, compact_mask: torch.Tensor) -> None:
        """Bring family-specific language-model arguments in line with a pre-LLM compaction (``source``: each
        compacted position's index in the uncompacted sequence)."""

    def mask_blocks(self, arguments: dict, source: torch.Tensor, compact_mask: torch.Tensor) -> torch.Tensor | None:
        """``(B, Lc)`` bidirectional attention blocks of the compacted prompt (block id per token, -1 outside), for a
        family whose language model lets media tokens see their whole block at prefill (Gemma 3), read from the
        multimodal forward's ``arguments``; ``source``: each compacted position's index in the uncompacted
        sequence. None: the prompt is causal."""
        return None

    def refused_generation(self, setting: Callable[[str], Any]) -> list[str]:
        """Family-specific generate() settings the engine cannot follow (``setting(name)`` reads one); each entry
        says what and why."""
        return []

    def install_capture(self, extra: tuple[str, ...] = ()) -> list[torch.utils.hooks.RemovableHandle]:
        """Hooks that record the vision encoder internals the lazy fields need; returns their handles. ``extra``
        names the optional fields the attached method reads (``Pruner.encoder_fields``) whose capture costs memory
        on every forward, so they are captured only when asked for."""
        return []

    def install_encoder_pruning(self, pruner: Any) -> list:
        """Hooks that let ``pruner`` (``prunes_in_encoder``: FlowCut) shorten the sequence inside the vision tower;
        returns their handles. Families without the mechanism refuse."""
        raise ValueError(f"{pruner.name} prunes inside the vision encoder, which mmprune implements for LLaVA-1.5's "
                         f"CLIP tower only, not for {self.family}")

    def restore_pruned(self, modality: str, output: Any) -> Any:
        """After an encoder call whose tower dropped tokens (in-tower pruning): put each item's surviving features
        back at their slots (zeros elsewhere), so the prompt's placeholders and the features agree again."""
        return output

    def build_images(self, output: Any, args: tuple, kwargs: dict) -> list[MediaItem]:
        """One ``MediaItem`` per image, in the order the model scatters them into the sequence.

        ``output`` is what the model's ``get_image_features`` returned for ``(args, kwargs)``.
        """
        raise NotImplementedError

    def image_features_owner(self) -> nn.Module:
        """The module whose ``get_image_features`` produces the LLM-space image tokens."""
        return self.inner


# Queries per chunk when recomputing the attention each token receives (bounds the (heads, q, n) buffer).
QUERY_CHUNK = 512


def received_in_spans(q: torch.Tensor, k: torch.Tensor, bounds: list[int], scaling: float) -> torch.Tensor:
    """``(heads, seq)``: the mean attention each token receives from every query of its span, for a tower whose
    attention runs inside spans (``bounds`` = its ``cu_seqlens``); ``q``, ``k`` are ``(heads, seq, d)``. Equals the
    column means of each span's softmax(q k^T * scaling), computed a chunk of queries at a time."""
    received = torch.zeros(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k[:, start:end].float()
            for q0 in range(start, end, QUERY_CHUNK):
                q1 = min(q0 + QUERY_CHUNK, end)
                probs = (q[:, q0:q1].float() @ keys.transpose(-1, -2) * scaling).softmax(dim=-1)
                received[:, start:end] += probs.sum(dim=1) / (end - start)
    return received


def once(cache: dict, key, compute: Callable[[], Any]) -> Any:
    """``cache[key]``, computed by ``compute()`` the first time it is asked for (per forward: the caches live in the
    adapter's capture store, cleared at each forward start)."""
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def capture_input(adapter: ModelAdapter, key: str) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) storing the module's first input and keyword arguments in the
    adapter's current capture store (replaced at every ``get_image_features`` call)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        adapter.captured[key] = (hidden, dict(kwargs))

    return hook


def capture_output(adapter: ModelAdapter, key: str) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        adapter.captured[key] = output[0] if isinstance(output, tuple) else output

    return hook
