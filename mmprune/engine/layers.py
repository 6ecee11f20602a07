"""In-LLM pruning: visual tokens leave the hidden states between decoder layers.

One forward pre-hook per decoder layer. During a pruned prefill:

* at a stage layer ``K`` the method chooses, per item (image or video), which of its current tokens go on; the hidden states are
  compacted (each sample re-padded on its original side, as before the first layer) and layers ``K..`` get a
  matching attention mask (built by transformers' own mask function of the layer's kind -- causal, sliding-window
  or the linear-attention padding mask -- against that layer's cache, with Gemma 3's bidirectional image blocks at
  prefill), position ids and rotary embeddings. Each layer's KV cache (or recurrent state) therefore holds only the
  tokens that entered it;
* the inputs of the layers a method scores with are recorded, so it can recompute the few attention rows it needs
  (:meth:`StageContext.attention`) while the model keeps SDPA/FlashAttention.

During decoding, every layer whose cache was shortened gets the mask for its own cache length and, when positions
are renumbered, its own position ids. A method with ``shrinks_earlier_caches`` (SEATS' reference behaviour) also cuts
every earlier layer's cache at each stage, so all layers then share the last stage's layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from mmprune import upstream
from mmprune.engine.sequence import ItemSpan, as_rows, compact_prefill, last_real, output_slots
from mmprune.media import Selection


@dataclass
class ItemTrack:
    """One item's (image's or video's) surviving tokens inside the LLM."""

    sample: int
    index_in_sample: int
    modality: str
    positions: torch.Tensor  # (n,) current sequence indices, ascending
    original: torch.Tensor  # (n,) index of each surviving token among the image's tokens before any pruning
    segments: list = field(default_factory=list)  # the item's grids (mmprune.media.Segment), original indices

    @property
    def count(self) -> int:
        return int(self.positions.numel())


@dataclass
class StageLayout:
    """The sequence after one in-LLM stage, kept for the decode steps of the layers it feeds."""

    layer: int
    compact_mask: torch.Tensor  # (B, Lc) bool
    next_positions: torch.Tensor  # (R, B) next position id per row after the stage's prompt
    position_rows: int
    carries: torch.Tensor  # (B, Lc) index (in the sequence that entered the stage) of the token each carries
    every_layer: bool = False  # the earlier layers' caches were shrunk to this layout too (layer is then 0)

    @property
    def length(self) -> int:
        return int(self.compact_mask.shape[1])


def rope_inputs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position ids for the rotary embedding, position ids the decoder layers receive) from ``(R, B, L)`` rows:
    1-D RoPE uses row 0 for both; Qwen2-VL's 4-row form feeds rows 1-3 to M-RoPE and row 0 (text positions) to
    the layers; its 3-row form feeds all three to M-RoPE and nothing to the layers."""
    if rows.shape[0] == 1:
        return rows[0], rows[0]
    if rows.shape[0] == 4:
        return rows[1:], rows[0]
    return rows, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dimensions of each head, the rest passed through (partial rotary:
    Qwen3.5 turns a quarter of each head)."""
    turned = cos.shape[-1]
    rotated = x[..., :turned] * cos + rotate_half(x[..., :turned]) * sin
    return rotated if turned == x.shape[-1] else torch.cat([rotated, x[..., turned:]], dim=-1)


class StageContext:
    """What an in-LLM method sees at one stage (all indices are positions in the current sequence).

    Attributes:
        layer: the stage layer; the chosen tokens are the ones that enter it.
        hidden: ``(B, L, D)`` hidden states entering ``layer``.
        mask: ``(B, L)`` bool, real (non-padding) tokens.
        tracks: one :class:`ItemTrack` per image or video (sample, modality, current positions, original indices).
        stage: index of this stage in the method's schedule.
    """

    def __init__(self, runner: LayerRunner, layer: int, hidden: torch.Tensor, stage: int) -> None:
        self.runner = runner
        self.layer = layer
        self.hidden = hidden
        self.mask = runner.mask
        self.tracks = runner.tracks
        self.stage = stage
        self._visual: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        """The language model."""
        return self.runner.language_model

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` through the language model's final norm (what the LM head reads)."""
        return upstream.final_norm(self.model)(hidden)

    def scaling(self, layer: int) -> float:
        """The attention scaling (``1/sqrt(head_dim)`` for most models) of decoder ``layer``."""
        return upstream.attention_parts(upstream.decoder_layers(self.model)[layer]).scaling

    @property
    def scratch(self) -> dict:
        """A dict a method may use to carry values between the stages of one prefill (cleared at each prefill)."""
        return self.runner.scratch

    def layer_input(self, layer: int) -> torch.Tensor:
        """Hidden states that entered decoder ``layer`` in this prefill (the method declared it in ``watch``)."""
        if layer == self.layer:
            return self.hidden
        if layer not in self.runner.records:
            raise RuntimeError(f"layer {layer}'s input was not recorded; declare it in the method's watch()")
        return self.runner.records[layer][0]

    def forget_before(self, layer: int) -> None:
        """Release the recorded inputs of the layers before ``layer`` (a method that watches many layers but reads
        only the latest frees the rest as it goes)."""
        for index in [index for index in self.runner.records if index < layer]:
            del self.runner.records[index]

    def last_token(self) -> torch.Tensor:
        """``(B,)`` index of each sample's last real token (the last instruction token at prefill)."""
        return last_real(self.mask)

    def visual(self) -> torch.Tensor:
        """``(B, L)`` bool: current visual tokens."""
        if self._visual is None:
            visual = torch.zeros_like(self.mask)
            for track in self.tracks:
                visual[track.sample, track.positions] = True
            self._visual = visual
        return self._visual

    def text_after(self, track: ItemTrack) -> torch.Tensor:
        """Positions of the real non-visual tokens after the image (the instruction), ascending."""
        after = self.mask[track.sample] & ~self.visual()[track.sample]
        after[: int(track.positions.max()) + 1 if track.count else 0] = False
        return after.nonzero().squeeze(1)

    def _rope(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == self.layer:
            return self.runner.current_rope()
        return self.runner.records[layer][1]

    def queries_keys(self, layer: int, queries: torch.Tensor | None, rope: bool = True, repeat: bool = True,
                     on: int | None = None):
        """Per-head queries ``(B, H, q, d)`` (rows ``queries`` ``(B, q)``; all rows when None) and keys
        ``(B, H, L, d)`` (GQA groups repeated; ``repeat=False``: the ``H_kv`` key heads) of decoder ``layer`` on its
        recorded input: the layer's own ``input_layernorm``, ``q_proj``/``k_proj`` (and Qwen3's per-head
        ``q_norm``/``k_norm``) and rotary embedding
        (``rope=False`` skips it, as FEATHER). ``on``: apply ``layer``'s projections to the input of decoder ``on``
        instead (SEATS scores with the previous layer's projections on the current hidden states)."""
        source = layer if on is None else on
        kind = self.runner.kinds[layer]
        if kind not in upstream.ATTENTION_KINDS:
            scored = [i for i, k in enumerate(self.runner.kinds) if k in upstream.ATTENTION_KINDS]
            raise ValueError(f"{self.runner.pruner.name} reads the attention of decoder layer {layer}, which is "
                             f"{kind} (no attention weights); this model's attention layers are {scored}: choose the "
                             "method's layers so that it reads one of them")
        attn = upstream.attention_parts(upstream.decoder_layers(self.model)[layer])
        hidden = attn.norm(self.layer_input(source))
        batch, length, _ = hidden.shape
        head_dim = attn.head_dim
        if queries is None:
            queries = torch.arange(length, device=hidden.device).expand(batch, -1)
        picked = hidden.gather(1, queries.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        q = attn.q_norm(attn.queries(picked)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hidden).view(batch, length, -1, head_dim)).transpose(1, 2)
        if rope:
            cos, sin = upstream.rope_tables(self.model, *self._rope(source))
            # the model may have computed one (1, L) table for the whole batch
            cos, sin = cos.to(q.dtype).expand(batch, -1, -1), sin.to(q.dtype).expand(batch, -1, -1)
            cos_q = cos.gather(1, queries.unsqueeze(-1).expand(-1, -1, cos.shape[-1])).unsqueeze(1)
            sin_q = sin.gather(1, queries.unsqueeze(-1).expand(-1, -1, sin.shape[-1])).unsqueeze(1)
            q = rotate(q, cos_q, sin_q)
            k = rotate(k, cos.unsqueeze(1), sin.unsqueeze(1))
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and repeat:
            k = k.repeat_interleave(groups, dim=1)
        return q, k

    @torch.no_grad()
    def sample_attention(self, layer: int, sample: int, queries: torch.Tensor, rope: bool = True) -> torch.Tensor:
        """``(H, q, L)``: :meth:`attention` for one sample's query rows ``queries`` ``(q,)``."""
        batch = self.mask.shape[0]
        rows = torch.zeros(batch, queries.numel(), dtype=torch.long, device=queries.device)
        rows[sample] = queries
        # other samples get row 0 as a placeholder; their rows are computed and discarded
        return self.attention(layer, rows, rope)[sample]

    @torch.no_grad()
    def attention(self, layer: int, queries: torch.Tensor, rope: bool = True, on: int | None = None) -> torch.Tensor:
        """``(B, H, q, L)`` attention probabilities of rows ``queries`` ``(B, q)`` in decoder ``layer``:
        ``softmax(q k^T * scaling + causal/padding mask)`` in float32, equal to those rows of the eager
        attention weights (the model itself keeps its attention implementation). ``on``: see
        :meth:`queries_keys`."""
        q, k = self.queries_keys(layer, queries, rope, on=on)
        scaling = self.scaling(layer)
        logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
        length = k.shape[2]
        keys = torch.arange(length, device=k.device)[None, None, None, :]
        rows = queries[:, None, :, None]
        allowed = keys <= rows
        blocks = self.runner.blocks
        if blocks is not None:  # Gemma 3: media tokens see their whole block (bidirectional), as the model's mask
            row_blocks = blocks.gather(1, queries)[:, None, :, None]
            allowed = allowed | ((row_blocks >= 0) & (row_blocks == blocks[:, None, None, :]))
        window = upstream.sliding_window(self.model, layer)
        if window is not None:
            allowed = allowed & (rows - keys < window)
        allowed = allowed & self.mask[:, None, None, :]
        return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


@dataclass
class PrefillRecord:
    """Stats of one pruned prefill, per stage."""

    layers: list[int] = field(default_factory=list)
    selection_ms: list[float] = field(default_factory=list)
    kept: list[list[list[int]]] = field(default_factory=list)  # [stage][image] original indices kept


class LayerRunner:
    """Hooks on every decoder layer that carry out a method's in-LLM schedule."""

    def __init__(self, pruner: Any, adapter: Any, policy: str) -> None:
        self.pruner = pruner
        self.adapter = adapter
        self.policy = policy
        self.language_model = adapter.language_model
        self.num_layers = adapter.num_layers
        self.stage_layers: list[int] = []
        self.watch: set[int] = set()
        self.mode: str | None = None
        self.handles: list = []
        self.records: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.replacement: dict | None = None
        self.layouts: list[StageLayout] = []
        self.kinds = upstream.layer_kinds(self.language_model)
        self.blocks: torch.Tensor | None = None  # (B, L) bidirectional media block per token (Gemma 3), -1 outside
        self.steps = 0

    def install(self) -> list:
        for index, (layer, kind) in enumerate(zip(upstream.decoder_layers(self.language_model), self.kinds)):
            if kind not in upstream.LAYER_KINDS:
                raise ValueError(f"{self.pruner.name}: decoder layer {index} uses {kind}; in-LLM pruning supports "
                                 f"{', '.join(upstream.LAYER_KINDS)} layers")
            self.handles.append(layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True))
        return self.handles

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self.mode == "prefill":
                return self._prefill_layer(index, args, kwargs)
            if self.mode == "decode":
                return self._decode_layer(index, args, kwargs)
            return None

        return hook

    # ------------------------------------------------------------------ prefill
    def plan(self, tracks: list[ItemTrack]) -> list[list[int]]:
        """The method's stage layers (checked) and, per item, the most tokens left after each stage."""
        layers, counts = self.pruner.plan(tracks, self.num_layers)
        layers = [int(layer) for layer in layers]
        if layers != sorted(set(layers)) or not all(0 < layer < self.num_layers for layer in layers):
            raise ValueError(f"{self.pruner.name}: stage layers {layers} must be increasing and within "
                             f"1..{self.num_layers - 1} for a {self.num_layers}-layer language model")
        for track, image_counts in zip(tracks, counts):
            if len(image_counts) != len(layers) or any(
                    not 0 <= c <= prev for c, prev in zip(image_counts, [track.count, *image_counts])):
                raise ValueError(f"{self.pruner.name}: schedule {image_counts} for an image of {track.count} "
                                 f"tokens must give one non-increasing count per stage {layers}")
        early = [layer for layer in layers if layer < self.adapter.deepstack_layers]
        if early:
            raise ValueError(f"{self.pruner.name}: a stage at layer {early[0]} is inside the DeepStack layers "
                             f"0..{self.adapter.deepstack_layers - 1} of {self.adapter.family}, which add visual "
                             f"features at the visual positions; stage layers must be >= {self.adapter.deepstack_layers}"
                             " (pass layers=/layer= accordingly)")
        self.stage_layers = layers
        self.watch = set(self.pruner.watch(self.num_layers, layers))
        return counts

    def start_prefill(self, cache: Any, mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                      hidden_shape: torch.Size, tracks: list[ItemTrack], counts: list[list[int]],
                      blocks: torch.Tensor | None = None) -> PrefillRecord:
        """``blocks``: the family's bidirectional media blocks of the sequence entering the first layer (Gemma 3;
        see ``ModelAdapter.mask_blocks``), carried through every stage's compaction."""
        batch, length = hidden_shape[0], hidden_shape[1]
        device = tracks[0].positions.device if tracks else None
        self.mode = "prefill"
        self.cache = cache
        self.mask = (mask.bool() if mask is not None
                     else torch.ones(batch, length, dtype=torch.bool, device=device))
        # explicit positions (what the model would compute itself when given none: 0..L-1 on an empty cache)
        self.position_ids = (position_ids if position_ids is not None
                             else torch.arange(length, device=device).expand(batch, -1))
        self.tracks = tracks
        self.counts = counts  # [image][stage] tokens left after each stage
        self.records = {}
        self.scratch: dict = {}  # what a method keeps between the stages of one prefill
        self.replacement = None
        self.blocks = blocks
        self.layouts = []
        self.record = PrefillRecord()
        return self.record

    def current_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the current sequence: ours after a stage, else what the model gave this layer."""
        if self.replacement is not None:
            return self._replaced(self._current)["position_embeddings"]
        return self._given_rope

    def _replaced(self, index: int) -> dict:
        """The mask, rotary embedding and position ids decoder ``index`` gets after a stage: built once per layer
        kind, against the first layer of that kind after the stage (every later one holds the same cache length)."""
        kind = self.kinds[index]
        if kind not in self.replacement:
            hidden, rotary_ids, layer_ids = self.replacement["inputs"]
            self.replacement[kind] = {
                "attention_mask": upstream.layer_mask(self.language_model, hidden, self.mask, self.cache, index,
                                                      self.blocks),
                "position_embeddings": upstream.rotary_embedding(self.language_model, hidden, rotary_ids, kind),
                "position_ids": layer_ids,
            }
        return self.replacement[kind]

    def _prefill_layer(self, index: int, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        self._given_rope = kwargs.get("position_embeddings")
        self._current = index
        if index in self.stage_layers:
            hidden = self._stage(index, hidden)
        if self.replacement is not None:
            kwargs.update(self._replaced(index))
        if index in self.watch:
            self.records[index] = (hidden, kwargs.get("position_embeddings"))
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _stage(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.stage_layers.index(index)
        wanted = [counts[stage] for counts in self.counts]
        # a schedule that keeps every token is the identity, unless the method decides counts itself (then the
        # schedule's count is only an upper bound)
        if not self.pruner.variable_counts and all(k == track.count for k, track in zip(wanted, self.tracks)):
            selections = [Selection.identity(track.count, device=hidden.device) for track in self.tracks]
            elapsed = 0.0
        else:
            started = time.perf_counter()
            selections = self.pruner.choose(StageContext(self, index, hidden, stage), stage, wanted)
            if hidden.is_cuda:
                torch.cuda.synchronize(hidden.device)
            elapsed = (time.perf_counter() - started) * 1000.0
            for k, sel in zip(wanted, selections):
                if sel.count > k:
                    raise RuntimeError(f"{self.pruner.name} kept {sel.count} tokens of an image at layer {index}; "
                                       f"its schedule allows {k}")
        self.record.layers.append(index)
        self.record.selection_ms.append(elapsed)
        self.record.kept.append([track.original[sel.slots.to(track.original.device)].tolist()
                                 for sel, track in zip(selections, self.tracks)])
        if all(sel.is_identity(track.count) for sel, track in zip(selections, self.tracks)):
            return hidden  # nothing leaves: the layers keep the model's own mask and positions
        return self._compact(index, hidden, selections)

    def _compact(self, index: int, hidden: torch.Tensor, selections: list[Selection]) -> torch.Tensor:
        spans = [ItemSpan(sample=t.sample, positions=t.positions, selection=s)
                 for t, s in zip(self.tracks, selections)]
        new_hidden, _, new_positions, layout = compact_prefill(hidden, self.mask, self.position_ids, spans,
                                                               self.policy)
        for track, sel in zip(self.tracks, selections):
            # output token j sits in its own slot, or the item's j-th (see ItemSpan.output_slots)
            track.positions = layout.destinations(track.sample, output_slots(track.positions, sel))
            track.original = track.original[sel.slots.to(track.original.device)]
        self.mask = layout.compact_mask
        self.position_ids = new_positions
        if self.blocks is not None:  # the kept media tokens of a block stay one block
            self.blocks = self.blocks.gather(1, layout.source).masked_fill(~layout.compact_mask, -1)
        rotary_ids, layer_ids = rope_inputs(as_rows(new_positions, hidden.shape[0]))
        self.replacement = {"inputs": (new_hidden, rotary_ids, layer_ids)}
        shrink = getattr(self.pruner, "shrinks_earlier_caches", False) and self.cache is not None
        if shrink:
            # the method's reference also removes the tokens from every earlier layer's cache: all of them held
            # the sequence that entered this stage, and now hold what leaves it, so one layout serves every layer
            for layer in range(index):
                try:
                    upstream.gather_cache_layer(self.cache, layer, layout.source)
                except ValueError as error:
                    raise ValueError(f"{self.pruner.name} removes each stage's tokens from every earlier layer's "
                                     f"cache too (shrink_earlier_caches=False keeps them), but {error}") from None
            self.layouts = []
        self.layouts.append(StageLayout(layer=0 if shrink else index, compact_mask=layout.compact_mask,
                                        next_positions=layout.next_positions, position_rows=layout.position_rows,
                                        carries=layout.carries, every_layer=shrink))
        return new_hidden

    def end_forward(self) -> list[StageLayout]:
        self.mode = None
        self.records = {}
        self.replacement = None
        self.blocks = None
        return self.layouts

    # ------------------------------------------------------------------ decode
    def start_decode(self, cache: Any, layouts: list[StageLayout], base_length: int, mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, steps: int) -> None:
        """``mask``/``position_ids``: the step's inputs as the first layer sees them (prompt of ``base_length``
        tokens as it entered the LLM, then the decoded tokens); ``steps``: tokens decoded since the prefill (every
        layer's cache holds its prompt layout and these)."""
        self.mode = "decode" if layouts else None
        self.steps = steps
        self.cache = cache
        self.decode_layouts = layouts
        self.base_length = base_length
        self.step_mask = mask
        self.step_positions = position_ids

    def _decode_layer(self, index: int, args: tuple, kwargs: dict):
        layout = None
        for candidate in self.decode_layouts:
            if candidate.layer <= index:
                layout = candidate
        if layout is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, query = hidden.shape[0], hidden.shape[1]
        steps = self.steps
        if self.step_mask is not None:
            tail = self.step_mask[:, self.base_length:].bool()
        else:
            tail = torch.ones(batch, steps + query, dtype=torch.bool, device=hidden.device)
        mask = torch.cat([layout.compact_mask, tail], dim=1)
        kwargs["attention_mask"] = upstream.layer_mask(self.language_model, hidden, mask, self.cache, index)
        if self.policy == "renumber":
            offsets = steps + torch.arange(query, device=hidden.device)
            rows = layout.next_positions.unsqueeze(-1) + offsets
            rotary_ids, layer_ids = rope_inputs(rows)
            kwargs["position_embeddings"] = upstream.rotary_embedding(self.language_model, hidden, rotary_ids,
                                                                      self.kinds[index])
            kwargs["position_ids"] = layer_ids
        return args, kwargs
