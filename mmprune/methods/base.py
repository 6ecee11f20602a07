"""The contract every method follows.

A method is a dataclass whose fields are its hyper-parameters. ``Pruner`` owns the mechanism (budget validation,
attaching to a model, stats); a pre-LLM method overrides one function, :meth:`PreLLMPruner.select`, which maps one
image's :class:`~mmprune.engine.tokens.VisualTokens` and a token count ``k`` to a
:class:`~mmprune.engine.tokens.Selection`. Everything about where tokens live in a model is in ``engine/`` and
``models/``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Iterator

import torch

from mmprune.budget import resolve_keep, validate_keep
from mmprune.engine.tokens import Selection, VisualTokens

if TYPE_CHECKING:  # pragma: no cover
    from mmprune.engine.session import PruningSession

POSITION_POLICIES = ("renumber", "original")


@dataclass
class Pruner:
    """Base of every method.

    Args:
        keep: visual tokens kept per image: an int count, or a float fraction in (0, 1].
        positions: position ids of the tokens that stay. ``"renumber"`` gives the shortened sequence contiguous ids
            (what LLaVA-code references do); ``"original"`` keeps each token's original id, incl. M-RoPE (t, h, w).
            ``None`` (default) picks the reference behaviour for the model family: renumber on LLaVA / LLaVA-NeXT,
            original on Qwen2-VL / Qwen2.5-VL.
    """

    keep: int | float = 0.25
    positions: str | None = None

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    _stats: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"positions={self.positions!r} is not a position policy: expected one of {POSITION_POLICIES} or None"
            )

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator["PruningSession"]:
        """Hook this method into ``model`` (a stock HF VLM); every hook is removed on exit, also on an exception."""
        from mmprune.engine.session import PruningSession

        session = PruningSession(self, model)
        session.install()
        try:
            yield session
        finally:
            session.remove()

    @property
    def stats(self) -> dict | None:
        """JSON-serialisable description of the last forward that carried images (``None`` before any)."""
        return self._stats

    def budget(self, num_tokens: int) -> int:
        return resolve_keep(self.keep, num_tokens)


@dataclass
class PreLLMPruner(Pruner):
    """A method that chooses each image's tokens once, before the first decoder layer."""

    stage: ClassVar[str] = "pre-llm"

    def prune_image(self, tokens: VisualTokens) -> Selection:
        k = self.budget(tokens.num_tokens)
        if k == tokens.num_tokens:
            # Keeping every token is the identity for every method (merging methods included), so the model's
            # output is exactly the unpruned one.
            return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
        selection = self.select(tokens, k)
        if selection.count > k:
            raise RuntimeError(f"{self.name} returned {selection.count} tokens for a budget of {k}")
        return selection

    def select(self, tokens: VisualTokens, k: int) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError


def scale_layers(layers: list[int] | tuple[int, ...], num_layers: int, reference_depth: int = 32) -> list[int]:
    """A schedule given for a ``reference_depth``-layer LLM (the papers' 7B models) moved to ``num_layers``,
    keeping each stage at the same relative depth (at least layer 1, strictly increasing)."""
    out: list[int] = []
    for layer in layers:
        scaled = max(1, round(layer * num_layers / reference_depth))
        scaled = max(scaled, out[-1] + 1) if out else scaled
        if scaled >= num_layers:
            raise ValueError(f"a {num_layers}-layer language model is too shallow for the stages {list(layers)} "
                             f"(given for {reference_depth} layers); pass explicit layers")
        out.append(scaled)
    return out


@dataclass
class InLLMPruner(Pruner):
    """A method that removes visual tokens between decoder layers during prefill, in one or more stages.

    The engine calls :meth:`stage_layers` once, :meth:`schedule` per image (how many of its tokens are left after
    each stage) and, at each stage layer, :meth:`choose` with a
    :class:`~mmprune.engine.layers.StageContext`. The default :meth:`choose` keeps the top-k of :meth:`scores`
    per image, in original order; a method overrides :meth:`scores` (and :meth:`watch` for the layers whose inputs
    it reads), or :meth:`choose` itself.
    """

    stage: ClassVar[str] = "in-llm"
    default_positions: ClassVar[str | None] = None

    def stage_layers(self, num_layers: int) -> list[int]:  # pragma: no cover - abstract
        """Decoder layers before which visual tokens leave (each sees the reduced sequence), increasing."""
        raise NotImplementedError

    def watch(self, num_layers: int) -> set[int]:
        """Decoder layers (besides the stage layer) whose inputs the method reads."""
        return set()

    def schedule(self, num_tokens: int, num_layers: int) -> list[int]:  # pragma: no cover - abstract
        """Tokens of one image left after each stage (non-increasing), given ``num_tokens`` entering the LLM."""
        raise NotImplementedError

    def describe_schedule(self) -> dict:
        """What the stats report about the budget: how ``keep`` was turned into the schedule."""
        return {"keep": self.keep}

    def scores(self, ctx, stage: int) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, L)`` importance of every position of the current sequence (only visual ones are read)."""
        raise NotImplementedError

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        scores = self.scores(ctx, stage)
        return [Selection.of(torch.topk(scores[track.sample, track.positions].float(), k).indices)
                for track, k in zip(ctx.tracks, counts)]


@dataclass
class SingleStagePruner(InLLMPruner):
    """One stage: ``keep`` visual tokens per image (count or fraction of those entering the LLM) go on from
    decoder layer ``layer``."""

    layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer={self.layer!r}: expected an int >= 1 (the decoder layer the kept tokens enter)")

    def stage_layers(self, num_layers: int) -> list[int]:
        if self.layer >= num_layers:
            raise ValueError(f"layer={self.layer} is not inside a {num_layers}-layer language model: expected "
                             f"1..{num_layers - 1}")
        return [self.layer]

    def schedule(self, num_tokens: int, num_layers: int) -> list[int]:
        return [self.budget(num_tokens)]

    def describe_schedule(self) -> dict:
        return {"keep": self.keep, "mode": "single stage", "layer": self.layer}
