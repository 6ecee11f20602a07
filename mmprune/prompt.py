"""The shared vocabulary of a prompt's text, for methods that choose media tokens by the question.

A pre-LLM method that sets ``reads_prompt = True`` finds, on every :class:`~mmprune.media.MediaItem` it is given,
``item.prompt``: a :class:`PromptText` holding its sample's text tokens as the LLM receives them (ids and input
embeddings; padding and media placeholders excluded) and which of them are the user's instruction rather than the
chat template. Every item of a sample shares the same object, so all its images see the same instruction. Methods
that do not ask find ``item.prompt is None`` and cost nothing.

How the instruction is told from the template (:class:`TemplateSpec`): given the tokenizer at attach
(``pruner.attach(model, tokenizer=processor)``), the chat template is rendered once around a sentinel message; the
tokens it puts after the user's content (the end of the turn and the assistant header, e.g. ``" ASSISTANT:"`` or
``"<|im_end|>\\n<|im_start|>assistant\\n"``), before it (system prompt, user header) and around an image placeholder
(``<|vision_start|>`` ... ``<|vision_end|>``, a newline) are the template. The instruction is then the text between
the sample's last media span (with its wrapper) and the template's tail; when nothing is there (the question comes
before the image), the text between the template's head and the first media span. Without a tokenizer the template
is unknown: the instruction is every text token after the last media span, the template's tail included, and
``located`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SENTINEL = "mmprunesentinelinstruction"


@dataclass
class PromptText:
    """One sample's prompt text.

    Attributes:
        ids: ``(T,)`` the sample's text token ids in prompt order (padding and media placeholder tokens excluded).
        embeds: ``(T, D)`` their LLM input embeddings (rows of the language model's embedding table).
        positions: ``(T,)`` their indices in the sample's row of ``input_ids``.
        instruction: ``(T,)`` bool, the tokens of the user's instruction (not the chat template, not the wrappers
            around media).
        text: the instruction decoded by the tokenizer given at attach (``None`` without one).
        located: how the instruction was told from the template: ``"template"`` (from the tokenizer's chat
            template), ``"after media"`` (no tokenizer: every text token after the last media span),
            ``"last token"`` (no instruction token found: the prompt's last text token stands in).
    """

    ids: torch.Tensor
    embeds: torch.Tensor
    positions: torch.Tensor
    instruction: torch.Tensor
    text: str | None = None
    located: str = "template"

    @property
    def instruction_ids(self) -> torch.Tensor:
        return self.ids[self.instruction]

    @property
    def instruction_embeds(self) -> torch.Tensor:
        """``(I, D)`` the instruction's LLM input embeddings (at least one row: see ``located``)."""
        return self.embeds[self.instruction]


@dataclass
class TemplateSpec:
    """What a tokenizer's chat template adds around a user's message, as token ids (see the module docstring)."""

    head: list[int] = field(default_factory=list)  # tokens before the user's content (system prompt, user header)
    tail: list[int] = field(default_factory=list)  # tokens after it (end of turn, assistant header)
    before_media: list[int] = field(default_factory=list)  # wrapper tokens just before a media placeholder span
    after_media: list[int] = field(default_factory=list)  # wrapper tokens just after it

    @classmethod
    def from_tokenizer(cls, tokenizer, media_token_ids: list[int]) -> "TemplateSpec":
        """Render the chat template of ``tokenizer`` (a tokenizer or a processor, whose own template is used)
        around a sentinel message, and read off the template's tokens by character offsets (a fast tokenizer)."""
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        render = getattr(tokenizer, "apply_chat_template", None)
        if render is None or not getattr(text_tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} cannot tell the instruction from the chat template: pass "
                             "the model's processor or its fast tokenizer (one with a chat template)")

        def tokens(content) -> tuple[str, list[int], list[tuple[int, int]]]:
            text = render([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
            encoded = text_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return text, list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

        def before(offsets, at: int) -> int:
            """Tokens that end at or before character ``at``."""
            return sum(1 for _, end in offsets if end <= at)

        def after(offsets, at: int) -> int:
            """Index of the first token that starts at or after character ``at``."""
            return next((i for i, (start, _) in enumerate(offsets) if start >= at), len(offsets))

        try:
            text, ids, offsets = tokens([{"type": "text", "text": SENTINEL}])
        except Exception:  # a text-only template takes the content as a string
            text, ids, offsets = tokens(SENTINEL)
        at = text.index(SENTINEL)
        spec = cls(head=ids[:before(offsets, at)], tail=ids[after(offsets, at + len(SENTINEL)):])
        names = [text_tokenizer.convert_ids_to_tokens(i) for i in media_token_ids]
        try:
            text, ids, offsets = tokens([{"type": "image"}, {"type": "text", "text": SENTINEL}])
        except Exception:
            return spec  # the template places no media: no wrappers to strip
        found = [(text.find(name), name) for name in names if name and text.find(name) >= 0]
        if not found or SENTINEL not in text:
            return spec
        start, name = min(found)
        end = text.rfind(name) + len(name)
        first, last = before(offsets, start), after(offsets, end)
        spec.before_media = ids[len(spec.head):first] if ids[:len(spec.head)] == spec.head else []
        spec.after_media = ids[last:before(offsets, text.index(SENTINEL))]
        return spec


def prompt_text(ids: torch.Tensor, embeds: torch.Tensor, real: torch.Tensor, media: torch.Tensor,
                spec: TemplateSpec | None, tokenizer=None) -> PromptText:
    """One sample's :class:`PromptText`: ``ids`` ``(L,)`` its row of ``input_ids``, ``embeds`` ``(L, D)`` the LLM
    input, ``real`` ``(L,)`` its attention mask, ``media`` ``(L,)`` where its media placeholder tokens are."""
    real = real.bool()
    text = real & ~media
    positions = text.nonzero().squeeze(1)
    row = ids.tolist()
    valid = real.nonzero().squeeze(1)
    first_real, end = int(valid[0]), int(valid[-1]) + 1
    media_at = media.nonzero().squeeze(1)

    def strip(start: int, stop: int, lead: list[int], trail: list[int]) -> tuple[int, int]:
        if lead and row[start:start + len(lead)] == lead:
            start += len(lead)
        if trail and stop - len(trail) >= start and row[stop - len(trail):stop] == trail:
            stop -= len(trail)
        return start, stop

    if spec is None:
        start, stop = (int(media_at[-1]) + 1 if media_at.numel() else first_real), end
        located = "after media"
    else:
        located = "template"
        start, stop = strip(int(media_at[-1]) + 1 if media_at.numel() else first_real, end,
                            spec.after_media, spec.tail)
        if not bool(text[start:stop].any()) and media_at.numel():  # the question comes before the first media
            start, stop = strip(first_real, int(media_at[0]), spec.head, spec.before_media)
    instruction = (positions >= start) & (positions < stop)
    if not bool(instruction.any()):
        instruction = positions == positions[-1]
        located = "last token"
    decoded = None
    if tokenizer is not None:
        decoded = getattr(tokenizer, "tokenizer", tokenizer).decode(
            ids[positions[instruction]].tolist(), skip_special_tokens=True).strip()
    return PromptText(ids=ids[positions], embeds=embeds[positions], positions=positions, instruction=instruction,
                      text=decoded, located=located)
