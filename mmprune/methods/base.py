"""The contract every method follows.

A method is a dataclass whose fields are its hyper-parameters. ``Pruner`` owns the mechanism (budget validation,
attaching to a model, stats); a pre-LLM method overrides one function, :meth:`PreLLMPruner.select`, which maps one
image's :class:`~mmprune.media.MediaItem` and a token count ``k`` to a
:class:`~mmprune.media.Selection`. Everything about where tokens live in a model is in ``engine/`` and
``models/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from mmprune.budget import resolve_keep, validate_keep
from mmprune.media import MediaItem, Segment, Selection
from mmprune.methods.params import Bool, Int, Layers, invalid, param

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

    keep: int | float = field(default=0.25, metadata={"help": "the budget (see keep_means)"})
    keep_audio: int | float | None = field(default=None, metadata={
        "help": "the audio budget, counted as keep is (None: keep); only on methods that prune audio"})
    positions: str | None = field(default=None, metadata={
        "help": "position ids of the tokens that stay: 'renumber', 'original', or None (the family's reference)"})

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    keep_means: ClassVar[str] = "visual tokens kept per image"  # what `keep` counts, for docs, CLI and sweeps
    # the media whose tokens the method prunes; the engine refuses an input carrying any other (it would pass
    # through unpruned). A method adds "video" when its paper's rule applies to a video's token span.
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    passes_through: ClassVar[tuple[str, ...]] = ()  # accepted media the method leaves whole by design (EVS: images)
    # optional encoder fields the method reads whose capture costs memory on every forward (e.g. every CLIP layer's
    # input for "cls_attention_by_layer"); the adapter captures them only for methods that list them
    encoder_fields: ClassVar[tuple[str, ...]] = ()
    # whether an image (pre-LLM: an adaptive count, keep its upper bound) or a stage (in-LLM) may keep fewer tokens
    # than its budget or its schedule's count
    variable_counts: ClassVar[bool] = False
    # the model families (adapter ``family`` names) the method supports; empty: every family. Others are refused at
    # attach (:meth:`check_family`)
    families: ClassVar[tuple[str, ...]] = ()
    # whether the method prunes inside the vision encoder (FlowCut): the adapter then installs the encoder hooks that
    # call its ``encoder_start`` / ``encoder_layer``
    prunes_in_encoder: ClassVar[bool] = False
    # whether the method's selection reads the prompt (a pre-LLM method then finds ``item.prompt``, a
    # :class:`~mmprune.prompt.PromptText`); such a selection cannot be cached by the image alone. A method whose
    # options decide it (IDPruner's text importance) sets it on the instance; read it from the instance
    reads_prompt: ClassVar[bool] = False

    _stats: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        if self.keep_audio is not None:
            if not self.prunes("audio"):
                pruning = sorted(name for name, cls in _registered().items() if cls.prunes("audio"))
                raise ValueError(f"{self.name} does not prune audio, so keep_audio does not apply; methods that "
                                 f"do: {', '.join(pruning) or 'none yet'}")
            try:
                validate_keep(self.keep_audio)
            except ValueError as exc:
                raise ValueError(str(exc).replace("keep=", "keep_audio=", 1)) from None
        if self.positions is not None and self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"positions={self.positions!r} is not a position policy: expected one of {POSITION_POLICIES} or None"
            )
        for spec in fields(self):
            check = spec.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, spec.name)
            if not check.check(value):
                raise invalid(self.name, spec.name, value, check)
            setattr(self, spec.name, check.normalise(value))

    @classmethod
    def prunes(cls, modality: str) -> bool:
        """Whether the method reduces ``modality``'s tokens (accepting a modality to pass it whole does not count)."""
        return modality in cls.modalities and modality not in cls.passes_through

    def attach(self, model: torch.nn.Module, tokenizer=None) -> PruningSession:
        """Hook this method into ``model`` (a stock HF VLM) now; returns the attachment.

        Use it as a context manager (``with pruner.attach(model): ...``: every hook is removed on exit, also on an
        exception), or keep it for a serving loop and call ``.detach()`` when done. Model-dependent values (stage
        layers beyond the model's depth, the position policy) are checked here.

        ``tokenizer`` (the model's processor or fast tokenizer) lets a method that reads the prompt
        (``reads_prompt``) tell the user's instruction from the chat template and read it as text (see
        :mod:`mmprune.prompt`); other methods ignore it.
        """
        from mmprune.engine.session import PruningSession

        session = PruningSession(self, model, tokenizer)
        session.install()
        return session

    def check_model(self, num_layers: int) -> None:
        """Raise ``ValueError`` for hyper-parameters a ``num_layers``-layer language model cannot honour."""

    def check_family(self, family: str) -> None:
        """Raise ``ValueError`` when the method does not support the model ``family`` (see ``families``)."""
        if self.families and family not in self.families:
            raise ValueError(f"{self.name} supports {', '.join(self.families)} only, not {family}")

    @property
    def stats(self) -> dict | None:
        """JSON-serialisable description of the last forward that carried images (``None`` before any)."""
        return self._stats

    def keep_for(self, modality: str) -> int | float:
        """The budget of one ``modality``'s items: ``keep_audio`` for audio when given, else ``keep``."""
        return self.keep_audio if modality == "audio" and self.keep_audio is not None else self.keep

    def budget(self, num_tokens: int, modality: str = "image") -> int:
        return resolve_keep(self.keep_for(modality), num_tokens)


@dataclass
class PreLLMPruner(Pruner):
    """A method that chooses each image's tokens once, before the first decoder layer."""

    stage: ClassVar[str] = "pre-llm"

    def prune_image(self, tokens: MediaItem) -> Selection:
        k = self.pre_llm_budget(tokens.num_tokens, tokens.modality)
        if k == tokens.num_tokens:
            # Keeping every token is the identity for every method (merging methods included), so the model's
            # output is exactly the unpruned one.
            return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
        selection = self.select(tokens, k)
        if selection.count > k:
            raise RuntimeError(f"{self.name} returned {selection.count} tokens for a budget of {k}")
        return selection

    def select(self, tokens: MediaItem, k: int) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def prompt_of(self, tokens: MediaItem):
        """The item's :class:`~mmprune.prompt.PromptText` (set by the engine for a method that ``reads_prompt``)."""
        if tokens.prompt is None:
            raise RuntimeError(f"{self.name} reads the prompt, but this item carries none (item.prompt is None): "
                               "the engine sets it for a method whose reads_prompt is true")
        return tokens.prompt

    def pre_llm_budget(self, num_tokens: int, modality: str = "image") -> int:
        """Tokens of an item of ``num_tokens`` that enter the LLM (``keep``, ``keep_audio`` for audio; hybrids derive
        it from their schedule)."""
        return self.budget(num_tokens, modality)

    def output_count(self, num_tokens: int, segments: list[Segment], modality: str = "image") -> int | None:
        """How many tokens :meth:`prune_image` will return for an item of ``num_tokens`` tokens laid out as
        ``segments``, known before it runs (a server reserves that many placeholders); ``None`` when the content
        decides (``variable_counts``: only the upper bound :meth:`pre_llm_budget` is known). The default is the
        budget; a method that may return fewer for a given layout (``pool``'s lattice) overrides this."""
        if self.variable_counts:
            return None
        return self.pre_llm_budget(num_tokens, modality)


@dataclass
class VideoPruner(PreLLMPruner):
    """A pre-LLM method that prunes videos only (EVS, DyCoke): images pass through whole, videos go to
    :meth:`prune_video`."""

    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    passes_through: ClassVar[tuple[str, ...]] = ("image",)

    def prune_image(self, tokens: MediaItem) -> Selection:
        if tokens.modality != "video":
            return Selection.identity(tokens.num_tokens, device=tokens.embeds.device)
        return self.prune_video(tokens)

    def prune_video(self, tokens: MediaItem) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_count(self, num_tokens: int, segments: list[Segment], modality: str = "image") -> int | None:
        if modality != "video":  # images pass through whole
            return num_tokens
        return super().output_count(num_tokens, segments, modality)


def check_encoder_layer(method: str, name: str, layer: int | None, depth: int, first: int = 0) -> None:
    """``ValueError`` when the hyper-parameter ``name`` (an encoder layer, numbered from ``first``) lies beyond a
    ``depth``-layer vision tower (known only once the tower has run)."""
    if layer is not None and layer > depth - 1 + first:
        raise ValueError(f"{method}: {name}={layer} is beyond the {depth}-layer vision tower: expected "
                         f"{first}..{depth - 1 + first}")


def _registered() -> dict:
    from mmprune.registry import METHODS

    return METHODS


def scale_layers(layers: list[int] | tuple[int, ...], num_layers: int, reference_depth: float = 32) -> list[int]:
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

    debias: bool = param(False, Bool(), "divide out sink and recency bias from attention scores before the top-k")

    stage: ClassVar[str] = "in-llm"
    default_positions: ClassVar[str | None] = None
    attention_scored: ClassVar[bool] = True  # whether debias applies (scores are attention probabilities)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.debias and not self.attention_scored:
            raise ValueError(f"{self.name} does not score tokens by attention, so debias=True does not apply")

    def image_scores(self, scores: torch.Tensor, track) -> torch.Tensor:
        """One image's scores as the top-k sees them: debiased (sinks, recency) when ``debias=True``."""
        if not self.debias:
            return scores
        from mmprune.methods.debias import debias_scores

        return debias_scores(scores, track.positions)

    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        """The stage layers (decoder layers before which visual tokens leave, increasing) and, per image (an
        :class:`~mmprune.engine.layers.ItemTrack`: ``count`` tokens entering the LLM, its ``segments``), the most
        tokens left after each stage (non-increasing)."""
        return self.stage_layers(num_layers), [self.schedule(image.count, num_layers, image.modality)
                                               for image in images]

    def stage_layers(self, num_layers: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self, num_tokens: int, num_layers: int,
                 modality: str = "image") -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def watch(self, num_layers: int, stage_layers: list[int]) -> set[int]:
        """Decoder layers (besides the current stage layer) whose inputs the method reads."""
        return set()

    def describe_schedule(self) -> dict:
        """What the stats report about the budget: how ``keep`` was turned into the schedule (a method that plans
        a schedule stores it in ``self._schedule``)."""
        return dict(getattr(self, "_schedule", {"keep": self.keep}))

    def scores(self, ctx, stage: int) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, L)`` importance of every position of the current sequence (only visual ones are read)."""
        raise NotImplementedError

    def choose(self, ctx, stage: int, counts: list[int]) -> list[Selection]:
        scores = self.scores(ctx, stage)
        return [Selection.of(torch.topk(self.image_scores(scores[track.sample, track.positions], track), k).indices)
                for track, k in zip(ctx.tracks, counts)]


@dataclass
class SingleStagePruner(InLLMPruner):
    """One stage: ``keep`` visual tokens per image (count or fraction of those entering the LLM) go on from
    decoder layer ``layer``."""

    layer: int = param(2, Int(1), "the decoder layer the kept tokens enter (K)")

    def check_model(self, num_layers: int) -> None:
        if self.layer >= num_layers:
            raise ValueError(f"{self.name}: layer={self.layer} is beyond the model: its language model has "
                             f"{num_layers} layers, so expected 1..{num_layers - 1}")

    def stage_layers(self, num_layers: int) -> list[int]:
        self.check_model(num_layers)
        return [self.layer]

    def schedule(self, num_tokens: int, num_layers: int, modality: str = "image") -> list[int]:
        return [self.budget(num_tokens, modality)]

    def describe_schedule(self) -> dict:
        return {"keep": self.keep, "mode": "single stage", "layer": self.layer}


def equivalent_tokens(num_tokens: int, layers: list[int], counts: list[int], num_layers: int) -> float:
    """``(1/L) * sum_l n_l``: visual tokens entering each decoder layer, averaged over the layers (the budget
    SparseVLM, PyramidDrop and VisionDrop report)."""
    bounds = [*layers, num_layers]
    total = layers[0] * num_tokens + sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(counts))
    return total / num_layers


@dataclass
class MultiStagePruner(InLLMPruner):
    """Several stages. ``keep`` is the **equivalent average budget** ``T_eq`` (an int count, or a fraction of the
    tokens entering the LLM): the schedule's strength (PyramidDrop's lambda, FEATHER's 1 - r, ...) is solved so
    the executed schedule averages at most ``keep`` tokens per layer. When even the weakest schedule at the
    paper's layers averages more (every token runs until the first stage), the stages move proportionally
    earlier until the budget is reachable. An explicit strength parameter or explicit ``layers`` override this;
    ``pruner.stats["schedule"]`` says which happened.

    Subclasses set ``paper_layers`` (for a ``paper_depth``-layer LLM, scaled to the model's depth),
    ``strength_field`` (the dataclass field that sets the strength explicitly) and implement
    :meth:`stage_counts`.
    """

    layers: list[int] | None = param(None, Layers(optional=True),
                                     "stage layers (default: the paper's, scaled to the model's depth)")

    keep_means: ClassVar[str] = "equivalent average visual tokens per layer"
    paper_layers: ClassVar[tuple[int, ...]] = ()
    paper_depth: ClassVar[int] = 32
    strength_field: ClassVar[str] = ""

    def stage_counts(self, image, strength: float, stages: int) -> list[int]:  # pragma: no cover - abstract
        """Most tokens of ``image`` (``.count``, ``.segments``) left after each of ``stages`` stages for a
        schedule strength in [0, 1] (1 keeps all)."""
        raise NotImplementedError

    def explicit_strength(self) -> float | None:
        return getattr(self, self.strength_field) if self.strength_field else None

    def check_model(self, num_layers: int) -> None:
        beyond = [layer for layer in self.layers or () if layer >= num_layers]
        if beyond:
            raise ValueError(f"{self.name}: layers={self.layers} is beyond the model: layer {beyond[0]} is not "
                             f"inside its {num_layers}-layer language model (expected layers in 1..{num_layers - 1})")

    def _average(self, image, strength: float, layers: list[int], num_layers: int) -> float:
        return equivalent_tokens(image.count, layers, self.stage_counts(image, strength, len(layers)), num_layers)

    def _target(self, image) -> float:
        return self.budget(image.count) if isinstance(self.keep, int) else self.keep * image.count

    def _solve(self, image, layers: list[int], num_layers: int) -> float:
        """The strongest schedule (largest strength) whose average stays within the image's budget."""
        target = self._target(image) + 1e-9
        if self._average(image, 1.0, layers, num_layers) <= target:
            return 1.0
        low, high = 0.0, 1.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if self._average(image, mid, layers, num_layers) <= target else (low, mid)
        return low

    def plan(self, images: list, num_layers: int) -> tuple[list[int], list[list[int]]]:
        layers = (list(self.layers) if self.layers is not None
                  else scale_layers(self.paper_layers, num_layers, self.paper_depth))
        how: dict = {"keep": self.keep}
        explicit = self.explicit_strength()
        if explicit is not None:
            how["mode"] = f"explicit {self.strength_field}"
            strengths = [explicit] * len(images)
        else:
            how["mode"] = "scaled to keep (equivalent average tokens)"
            shift = 1.0
            while any(self._average(image, 0.0, layers, num_layers) > self._target(image) + 1e-9
                      for image in images):
                if self.layers is not None or layers[0] == 1:
                    image = max(images, key=lambda i: self._average(i, 0.0, layers, num_layers) - self._target(i))
                    raise ValueError(
                        f"{self.name}: keep={self.keep} asks for {self._target(image):.1f} tokens per layer on "
                        f"average but stages at layers {layers} average at least "
                        f"{self._average(image, 0.0, layers, num_layers):.1f}; pass earlier layers or a larger keep")
                shift *= 0.9  # every stage moves earlier, same relative spacing
                layers = scale_layers(self.paper_layers, num_layers, self.paper_depth / shift)
                how["mode"] = "scaled to keep; stages moved earlier to reach it"
            strengths = [self._solve(image, layers, num_layers) for image in images]
        counts = [self.stage_counts(image, strength, len(layers)) for image, strength in zip(images, strengths)]
        self._strengths = strengths
        how.update(layers=layers, strength=[round(v, 6) for v in strengths], counts=counts,
                   planned_equivalent_tokens=[equivalent_tokens(image.count, layers, c, num_layers)
                                              for image, c in zip(images, counts)])
        self._schedule = how
        return layers, counts


@dataclass
class HybridPruner(PreLLMPruner, InLLMPruner):
    """A method with a pre-LLM stage (:meth:`select` per image, :meth:`pre_llm_budget` tokens) and in-LLM stages
    (:meth:`plan` over the tokens that entered the LLM)."""

    stage: ClassVar[str] = "pre+in-llm"
