"""How a padded batch shrinks: pure tensor bookkeeping for sequences that lose tokens before the first layer.

Prefill: every item span is rewritten with its selection (see :meth:`ItemSpan.output_slots`: output token ``j``
stays in the slot of token ``slots[j]`` when the slots ascend, else goes to the span's ``j``-th slot; either way it
takes the embedding and original position of token ``slots[j]``), the dropped slots leave, and each sample is
re-padded on its original padding side so the last prompt token stays last (what ``generate`` reads logits from).

Decode: ``generate`` keeps counting in the original layout (its attention mask and position ids cover the full
prompt). :class:`Layout` remembers the compacted prompt so each decode step's mask and positions can be rewritten to
match the shorter KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmprune.media import Selection


@dataclass
class ItemSpan:
    """Where one item's (image's or video's) tokens sit in the batch and what survives of them."""

    sample: int
    positions: torch.Tensor  # (N,) sequence indices of the item's tokens, ascending
    selection: Selection

    def output_slots(self) -> torch.Tensor:
        """``(k,)`` sequence indices the selection's output tokens occupy: each token's own slot when the slots
        ascend (every pure selection, and merges that keep slot order), so an item whose tokens interleave with
        another's (Qwen2.5-Omni's audio-in-video chunks) keeps its interleaving; otherwise the span's first ``k``
        slots in output order (VisionZip's appended merged tokens). For an item whose span is contiguous both give
        the same compacted sequence."""
        return output_slots(self.positions, self.selection)


def output_slots(positions: torch.Tensor, selection: Selection) -> torch.Tensor:
    """See :meth:`ItemSpan.output_slots` (``positions``: the item's current sequence indices, ascending)."""
    slots = selection.slots.to(positions.device)
    if bool((slots[1:] > slots[:-1]).all()):
        return positions[slots]
    return positions[:selection.count]


@dataclass
class Layout:
    """The compacted prompt of one prefill, kept for the decode steps that follow it."""

    original_length: int
    compact_mask: torch.Tensor  # (B, Lc) bool: real (non-padding) tokens of the compacted prompt
    next_positions: torch.Tensor  # (R, B) the last real token's position id + 1, per row (R = 1, 3 or 4)
    position_rows: int  # 0 when the model computed positions itself (position_ids=None), else R
    mask_dtype: torch.dtype
    source: torch.Tensor  # (B, Lc) index of each compacted token in the uncompacted sequence
    carries: torch.Tensor  # (B, Lc) index of the uncompacted token whose content (or slot, if merged) each carries
    identity: bool = False  # nothing left or changed: the prompt entered the LLM as given, decode steps too

    @property
    def compact_length(self) -> int:
        return int(self.compact_mask.shape[1])

    def destinations(self, sample: int, positions: torch.Tensor) -> torch.Tensor:
        """Compacted indices of tokens that survived, given their uncompacted ``positions`` in ``sample``."""
        inverse = torch.full((self.original_length,), -1, dtype=torch.long, device=self.source.device)
        real = self.compact_mask[sample]
        inverse[self.source[sample][real]] = torch.arange(self.compact_length, device=self.source.device)[real]
        found = inverse[positions.to(inverse.device)]
        if bool((found < 0).any()):
            raise RuntimeError("a token expected to survive the compaction was dropped")
        return found


def padding_side(mask: torch.Tensor) -> str:
    """'left' or 'right' for a 2-D 0/1 mask; a batch without padding counts as left-padded."""
    left = bool((~mask[:, 0]).any())
    right = bool((~mask[:, -1]).any())
    if left and right:
        raise ValueError("the attention mask pads some samples on the left and others on the right; pad one side")
    return "right" if right else "left"


def as_rows(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Position ids as ``(R, B, L)``: 2-D ``(B|1, L)`` becomes one row; M-RoPE ``(3|4, B, L)`` stays."""
    if position_ids.dim() == 2:
        return position_ids.expand(batch, -1).unsqueeze(0)
    if position_ids.dim() == 3:
        return position_ids.expand(-1, batch, -1)
    raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected (B, L) or (R, B, L)")


def compact_prefill(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    spans: list[ItemSpan],
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Layout]:
    """Apply the selections and drop the removed tokens. Returns (embeds, mask, position_ids, layout).

    ``policy`` is ``"renumber"`` (contiguous ids over the kept tokens, counted from the first real token) or
    ``"original"`` (each token keeps its id; M-RoPE rows included). The returned mask is ``None`` when the compacted
    batch has no padding and the caller passed none.
    """
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    real = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool,
                                                                               device=device)
    side = padding_side(real)
    mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long

    if position_ids is None:
        # What the language model would have used itself: 0..L-1 over the whole (uncached) prompt.
        rows = torch.arange(length, device=device).expand(1, batch, length)
    else:
        rows = as_rows(position_ids, batch)
    if all(span.selection.is_identity(span.positions.numel()) for span in spans):
        # Nothing leaves: the inputs stay exactly as given (padding slots and their positions included), so the
        # model computes what it computes unpruned.
        next_positions = after_last(rows, real)
        layout = Layout(original_length=length, compact_mask=real, next_positions=next_positions,
                        position_rows=0 if position_ids is None else rows.shape[0], mask_dtype=mask_dtype,
                        source=torch.arange(length, device=device).expand(batch, -1),
                        carries=torch.arange(length, device=device).expand(batch, -1), identity=True)
        return inputs_embeds, attention_mask, position_ids, layout
    embeds = inputs_embeds.clone()
    new_rows = rows.clone()
    keep = real.clone()
    carried = torch.arange(length, device=device).expand(batch, -1).clone()
    for span in spans:
        sel = span.selection
        slots = span.output_slots()
        sources = span.positions[sel.slots.to(device)]
        if sel.embeds is None:
            embeds[span.sample, slots] = inputs_embeds[span.sample, sources]
        else:
            embeds[span.sample, slots] = sel.embeds.to(embeds.dtype)
        new_rows[:, span.sample, slots] = rows[:, span.sample, sources]
        carried[span.sample, slots] = sources
        keep[span.sample, span.positions] = False
        keep[span.sample, slots] = True

    index, compact_mask = compaction_index(keep, side)
    # padding slots take a padding token's own embedding where the row had one (not a copy of a real token), so
    # whatever a caller reads at padded positions is what the unpruned model would give there
    padded = ~real
    index = torch.where(~compact_mask & padded.any(1, keepdim=True), padded.long().argmax(1, keepdim=True), index)
    gathered = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    compact_rows = new_rows.gather(2, index.unsqueeze(0).expand(new_rows.shape[0], -1, -1))
    renumbered = (compact_mask.long().cumsum(1) - 1).masked_fill(~compact_mask, 0)

    if policy == "renumber":
        compact_rows = renumbered.unsqueeze(0).expand(compact_rows.shape[0], -1, -1).clone()
    elif policy != "original":
        raise ValueError(f"unknown position policy {policy!r}")
    if compact_rows.shape[0] == 4:
        # Qwen2-VL's 4-row form: row 0 holds plain text positions, used only to detect packed sequences; it must
        # stay contiguous or the mask builder would split a sample at every removed token.
        compact_rows[0] = renumbered
    compact_rows = compact_rows.masked_fill(~compact_mask.unsqueeze(0), 0)
    next_positions = after_last(compact_rows, compact_mask)

    out_positions: torch.Tensor | None
    if position_ids is None and policy == "renumber":
        out_positions = None  # the model's own default (0..Lc-1) is the renumbering
        position_rows = 0
        next_positions = torch.full((1, batch), compact_mask.shape[1], device=device, dtype=torch.long)
    else:
        # the format the model was given: (R, B, L) rows stay rows; (B, L) and None (1-D RoPE) become (B, L)
        out_positions = compact_rows if position_ids is not None and position_ids.dim() == 3 else compact_rows[0]
        position_rows = compact_rows.shape[0]
    out_mask = None if attention_mask is None and bool(compact_mask.all()) else compact_mask.to(mask_dtype)
    layout = Layout(
        original_length=length,
        compact_mask=compact_mask,
        next_positions=next_positions,
        position_rows=position_rows,
        mask_dtype=mask_dtype,
        source=index,
        carries=carried.gather(1, index),
    )
    return gathered, out_mask, out_positions, layout


def last_real(real: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of each row's last real (non-padding) token of a ``(B, L)`` bool mask; -1 for an empty row."""
    columns = torch.arange(real.shape[1], device=real.device)
    return torch.where(real, columns, -1).amax(dim=1)


def after_last(rows: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(R, B)``: each row's position id at its last real token, + 1: where ``generate`` continues decoding
    (``position_ids[..., -1:] + 1``). Not the row maximum: after a Qwen2.5-VL video, temporal ids can exceed the
    trailing text's."""
    last = last_real(real).clamp(min=0)  # (B,)
    return rows.gather(2, last.view(1, -1, 1).expand(rows.shape[0], -1, 1)).squeeze(2) + 1


def compaction_index(keep: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index ``(B, Lc)`` that packs the kept tokens of each row in order, padded on ``side``; and the mask."""
    batch = keep.shape[0]
    counts = keep.sum(dim=1)
    width = int(counts.max()) if batch else 0
    offset = (width - counts) if side == "left" else torch.zeros_like(counts)
    dest = keep.long().cumsum(dim=1) - 1 + offset.unsqueeze(1)
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.zeros(batch, width, dtype=torch.long, device=keep.device)
    mask = torch.zeros(batch, width, dtype=torch.bool, device=keep.device)
    index[rows, dest[rows, cols]] = cols
    mask[rows, dest[rows, cols]] = True
    return index, mask


def decode_inputs(
    layout: Layout,
    cache_length: int,
    query_length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mask and position ids of a decode step, rewritten from the original layout to the compacted cache."""
    if layout.identity:
        return attention_mask, position_ids
    steps = cache_length - layout.compact_length
    if steps < 0:
        raise RuntimeError(f"KV cache holds {cache_length} tokens, fewer than the compacted prompt's "
                           f"{layout.compact_length}: the cache was not produced by this prefill")
    batch = layout.compact_mask.shape[0]
    device = layout.compact_mask.device
    if attention_mask is not None:
        expected = layout.original_length + steps + query_length
        if attention_mask.dim() != 2 or attention_mask.shape[1] != expected:
            raise ValueError(
                f"decode attention_mask has shape {tuple(attention_mask.shape)}; after a pruned prefill of "
                f"{layout.original_length} tokens and {steps} decoded ones, expected (batch, {expected})"
            )
        tail = attention_mask[:, layout.original_length:].bool()
        mask = torch.cat([layout.compact_mask, tail], dim=1).to(layout.mask_dtype)
    elif bool(layout.compact_mask.all()):
        mask = None
    else:
        tail = torch.ones(batch, steps + query_length, dtype=torch.bool, device=device)
        mask = torch.cat([layout.compact_mask, tail], dim=1).to(layout.mask_dtype)

    if layout.position_rows == 0 and position_ids is None:
        return mask, None  # the model counts from the cache length, which is the compacted count
    offsets = steps + torch.arange(query_length, device=device)
    rows = layout.next_positions.unsqueeze(-1) + offsets  # (R, B, q)
    if position_ids is not None and position_ids.dim() == 2:
        return mask, rows[0]
    if layout.position_rows in (0, 1):
        return mask, rows[0]
    return mask, rows
