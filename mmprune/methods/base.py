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
