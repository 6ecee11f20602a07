"""Attaching a method to a stock HF VLM: the hooks that take media tokens out before the first decoder layer.

Interception points, all removed on detach:

1. a forward pre-hook on the multimodal model (``model.model``) records ``input_ids`` (where the media tokens are)
   and refuses media the family or the method does not prune (they would pass through unpruned);
2. the model's ``get_image_features`` / ``get_video_features`` are wrapped (instance attributes shadowing the class
   methods) so the adapter can describe each image's or video's tokens to the method as a ``MediaItem``; an
   encoder of a modality the family or the method does not handle refuses before it runs;
3. a forward pre-hook on the language model rewrites its inputs: at prefill it applies the selections and compacts
   ``inputs_embeds`` / ``attention_mask`` / ``position_ids``; at each later step on the same KV cache it maps the
   mask and positions that ``generate`` computed for the original layout onto the compacted cache;
4. ``model.generate`` is wrapped to refuse, before anything runs, the decoding modes the engine cannot follow (no
   KV cache, beam search, several sequences per prompt, assisted decoding, static caches), and to know that a
   forward belongs to a generation;
5. for a method that prunes inside the vision encoder (``prunes_in_encoder``: FlowCut), the adapter's encoder hooks
   (``install_encoder_pruning``) shorten the tower's sequence between layers, and after each encoder call
   ``adapter.restore_pruned`` puts the surviving features back at their placeholder slots, so the rest of the engine
   sees an ordinary selection.

The language model keeps its attention implementation (SDPA, FlashAttention); nothing asks it for attention weights.
Every transformers detail these hooks rely on is read through :mod:`mmprune.upstream`.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from typing import Any

import torch
from torch import nn

from mmprune import upstream
from mmprune.engine.layers import ItemTrack, LayerRunner, StageLayout
from mmprune.engine.sequence import ItemSpan, Layout, compact_prefill, decode_inputs
from mmprune.media import MODALITIES, MediaItem, Selection
from mmprune.prompt import TemplateSpec, prompt_text

_MISSING = object()

# The module each live session hooks (the multimodal model), so a second attachment is refused, not stacked.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PruningSession:
    """One attachment of a method to one model, returned by ``pruner.attach(model)`` with its hooks installed.

    A context manager (``with pruner.attach(model): ...`` detaches on exit, also on an exception); for a long-lived
    attachment (a serving loop) keep it and call :meth:`detach`.
    """

    def __init__(self, pruner: Any, model: nn.Module, tokenizer: Any = None) -> None:
        from mmprune.models import adapter_for

        self.pruner = pruner
        self.model = model
        self.adapter = adapter_for(model)
        upstream.check_version()
        _verify_once(self.adapter)
        pruner.check_family(self.adapter.family)
        pruner.check_model(self.adapter.num_layers)
        method_default = getattr(pruner, "default_positions", None)
        if method_default == "renumber" and not self.adapter.supports_renumber:
            method_default = None  # the reference renumbers 1-D positions; M-RoPE models keep theirs
        self.policy = pruner.positions or method_default or self.adapter.default_positions
        if self.policy == "renumber" and not self.adapter.supports_renumber:
            raise ValueError(
                f"positions='renumber' is not defined for {self.adapter.family} (M-RoPE (t, h, w) positions); "
                "use positions='original' or None"
            )
        self._handles: list = []
        self._shadowed: list[tuple[Any, str, Any]] = []  # (object, attribute, previous instance value)
        self._generating = 0  # depth of model.generate calls in flight
        self._items: dict[str, list[MediaItem]] = {}  # per modality, what the encoders produced for this forward
        self._encoding: str | None = None  # the modality whose encoder is running (nested encoder calls belong to it)
        self._arguments: dict = {}  # the multimodal forward's arguments (the adapter reads per-item extras)
        self._input_ids: torch.Tensor | None = None
        self._layouts: dict[int, tuple[weakref.ref, Layout, list[StageLayout]]] = {}
        self.runner = LayerRunner(pruner, self.adapter, self.policy) if hasattr(pruner, "plan") else None
        self._pending: tuple | None = None  # (cache, layout, stats) of the prefill in flight
        self._output_index: torch.Tensor | None = None
        self._inner_signature = inspect.signature(self.adapter.inner.forward)
        self._cache_argument = upstream.cache_argument(self.adapter.language_model.forward)
        self._attn_implementation = getattr(self.adapter.language_model.config, "_attn_implementation", None)
        # a method that reads the prompt: the media placeholder ids, and the chat template's tokens when a tokenizer
        # is given (so the instruction is told from the template)
        self._reads_prompt = bool(getattr(pruner, "reads_prompt", False)) and hasattr(pruner, "prune_image")
        self._tokenizer = tokenizer if self._reads_prompt else None
        self._media_ids = [self.adapter.token_id(m) for m in self.adapter.modalities]
        self._template = (TemplateSpec.from_tokenizer(tokenizer, self._media_ids)
                          if self._reads_prompt and tokenizer is not None else None)

    # ------------------------------------------------------------------ attach / detach
    def install(self) -> None:
        adapter = self.adapter
        other = _ATTACHED.get(adapter.inner)
        if other is not None:
            raise ValueError(
                f"cannot attach {self.pruner.name}: {other.pruner.name} is already attached to this model; mmprune "
                "does not stack methods: detach the first one (leave its `with` block) before attaching another")
        owner = adapter.image_features_owner()

        def capturing(modality: str, encoder: Any) -> Any:
            # functools.wraps keeps the signature visible: generate() inspects it to pre-encode the media.
            @functools.wraps(encoder)
            def encode(*args: Any, **kwargs: Any) -> Any:
                if self._encoding is not None:  # called by another encoder (Qwen3-VL encodes videos as images)
                    return encoder(*args, **kwargs)
                self._refuse_unpruned({modality})
                adapter.captured = {}  # a fresh store per call; the items' lazy fields keep a reference to it
                self._encoding = modality
                try:
                    output = encoder(*args, **kwargs)
                finally:
                    self._encoding = None
                # in-tower pruning (FlowCut) shortened the features: back to one slot per placeholder token
                output = adapter.restore_pruned(modality, output)
                self._items[modality] = adapter.build_items(modality, output, args, kwargs)
                return output

            return encode

        generate = self.model.generate

        @functools.wraps(generate)
        def generate_tracked(*args: Any, **kwargs: Any) -> Any:
            self._check_generation(kwargs)
            self._generating += 1
            try:
                return generate(*args, **kwargs)
            finally:
                self._generating -= 1

        _ATTACHED[adapter.inner] = self
        # every encoder is wrapped: the supported ones to describe their items, the others to refuse before running
        for modality, name in upstream.feature_getters(owner).items():
            self._shadow(owner, name, capturing(modality, getattr(owner, name)))
        self._shadow(self.model, "generate", generate_tracked)
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
            self._handles.append(
                adapter.inner.register_forward_pre_hook(self._on_multimodal_forward, with_kwargs=True))
            self._handles.append(
                adapter.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True))
            if self.runner is not None:
                self._handles.append(adapter.language_model.register_forward_hook(self._after_language_model))
                self._handles.extend(self.runner.install())
            self._handles.extend(adapter.install_capture(self.pruner.encoder_fields))
            if self.pruner.prunes_in_encoder:
                self._handles.extend(adapter.install_encoder_pruning(self.pruner))
        except Exception:
            self.remove()
            raise

    def __enter__(self) -> "PruningSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        return _ATTACHED.get(self.adapter.inner) is self

    def detach(self) -> None:
        """Remove every hook; the model is exactly as before. Calling it again does nothing."""
        self.remove()

    def output_index(self) -> torch.Tensor | None:
        """``(B, L_out)``: for each position of the last pruned forward's output (its logits, its last hidden
        states), the index of the input token it carries in the sequence the caller passed; ``-1`` at padding.
        Kept tokens map to themselves; a merged token to the token whose slot it took (``Selection.slots``).
        ``None`` before any pruned forward. ``labels.gather(1, index.clamp(min=0))`` aligns labels with the pruned
        logits."""
        return self._output_index

    def _shadow(self, target: Any, name: str, value: Any) -> None:
        """Set an instance attribute over ``target``'s method ``name``, remembering what to restore."""
        self._shadowed.append((target, name, target.__dict__.get(name, _MISSING)))
        setattr(target, name, value)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for target, name, previous in reversed(self._shadowed):
            if previous is _MISSING:
                target.__dict__.pop(name, None)
            else:
                setattr(target, name, previous)
        self._shadowed.clear()
        if _ATTACHED.get(self.adapter.inner) is self:
            del _ATTACHED[self.adapter.inner]
        self._items = {}
        self._input_ids = None
        self._layouts.clear()
        self._pending = None
        self.adapter.captured = {}

    # ------------------------------------------------------------------ hooks
    def _check_generation(self, kwargs: dict) -> None:
        """Refuse, before anything runs, the decoding modes whose cache or batch handling the engine cannot follow."""
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)

        def setting(name: str, default: Any = None) -> Any:
            return kwargs[name] if name in kwargs else getattr(config, name, default)

        refused = []
        if (setting("num_beams", 1) or 1) > 1:
            refused.append(f"beam search (num_beams={setting('num_beams')})")
        if (setting("num_return_sequences", 1) or 1) > 1:
            refused.append(f"num_return_sequences={setting('num_return_sequences')}")
        if any(setting(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens",
                                                        "assistant_early_exit")):
            refused.append("assisted/speculative decoding")
        if setting("use_cache", True) is False:
            refused.append("use_cache=False (without a KV cache every step would re-run the prompt unpruned)")
        if setting("cache_implementation") not in (None, "dynamic"):
            refused.append(f"cache_implementation={setting('cache_implementation')!r} (static caches are not "
                           "supported; use the default dynamic cache)")
        refused += self.adapter.refused_generation(setting)
        if refused:
            raise ValueError(
                f"{self.pruner.name}: {'; '.join(refused)} is not supported with a pruner attached; generate() "
                "works with greedy or sampled decoding on the default dynamic KV cache (num_beams=1, "
                "num_return_sequences=1, use_cache=True)")

    def _refuse_unpruned(self, modalities: set[str]) -> None:
        """Raise for media the engine (on this family) or the method does not prune: they would pass unpruned."""
        family = modalities - set(self.adapter.modalities)
        if family:
            raise ValueError(
                f"{self.pruner.name}: the input carries {' and '.join(sorted(family))}, which mmprune does not "
                f"prune on {self.adapter.family} yet (supported: {', '.join(self.adapter.modalities)}); it would "
                "pass through unpruned, so it is refused: leave it out, or detach the pruner")
        method = modalities - set(self.pruner.modalities)
        if method:
            from mmprune.registry import METHODS

            able = sorted(name for name, cls in METHODS.items() if all(cls.prunes(m) for m in method))
            raise ValueError(
                f"{self.pruner.name} does not prune {' or '.join(sorted(method))} (it handles "
                f"{', '.join(self.pruner.modalities)}); methods that do: {', '.join(able)}")

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise ValueError(
                f"{self.pruner.name}: labels are not supported while a pruner is attached: the forward returns logits "
                "for the pruned sequence (fewer positions than the labels); compute the loss from those logits with "
                "session.output_index() (the original position of each output position), or detach the pruner")

    def _on_multimodal_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._inner_signature.bind_partial(*args, **kwargs).arguments
        arguments = {**bound.pop("kwargs", {}), **bound}
        carried = upstream.modalities_in(arguments)
        self._refuse_unpruned(carried)
        self._input_ids = arguments.get("input_ids")
        # Media reach the forward either as pixels (encoded inside it, through the wrappers) or pre-encoded by
        # generate() (the wrappers ran just before). A modality the forward does not carry is none of ours.
        self._items = {modality: items for modality, items in self._items.items() if modality in carried}
        self._arguments = arguments

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        items = [item for modality in MODALITIES for item in self._items.get(modality, [])]
        self._items = {}
        cache = kwargs.get(self._cache_argument)
        if self.runner is not None:
            self.runner.mode = None  # also clears what a forward that raised left behind
        if items:
            if cache is not None and not upstream.is_default_cache(cache):
                raise ValueError(
                    f"{type(cache).__name__} is not supported: pruning gives each layer its own KV length, which "
                    "needs the default dynamic cache; call generate() without cache_implementation/a prepared cache")
            if cache is None and self._generating and kwargs.get("use_cache") is False:
                raise ValueError(
                    "generate(use_cache=False) is not supported with a pruner attached: without a KV cache every "
                    "decoding step re-encodes the whole prompt, and its images would pass unpruned; use the default "
                    "use_cache=True (pruned tokens then stay out of the cache for every step)")
            return args, self._prefill(module, kwargs, items, cache)
        if cache is not None and id(cache) in self._layouts:
            ref, layout, stages = self._layouts[id(cache)]
            if ref() is cache:
                return args, self._decode(kwargs, layout, stages, cache)
        return None

    def _after_language_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.runner.mode == "prefill" and self._pending is not None:
            cache, layout, record = self._pending
            stages = self.runner.end_forward()
            if cache is not None:
                self._layouts[id(cache)] = (weakref.ref(cache), layout, stages)
            for stage in stages:
                index = self._output_index.gather(1, stage.carries)
                self._output_index = index.masked_fill(~stage.compact_mask, -1)
            self._add_stage_stats(record)
        self.runner.mode = None
        self._pending = None

    # ------------------------------------------------------------------ prefill / decode
    def _prefill(self, module: nn.Module, kwargs: dict, items: list[MediaItem], cache: Any) -> dict:
        if self._input_ids is None:
            raise ValueError("mmprune locates media tokens through input_ids; call the model with input_ids "
                             "(as the HF processor returns them), not inputs_embeds")
        if cache is not None and upstream.cache_length(cache) > 0:
            raise ValueError("pruning a prompt that continues a non-empty KV cache is not supported; "
                             "start generation from the full prompt")
        mask, mapped = self._mask_2d(kwargs.get("attention_mask"))
        embeds = kwargs["inputs_embeds"]
        items = self.adapter.group_items(items, self._input_ids)
        self.adapter.annotate(items, self._arguments)

        started = time.perf_counter()
        spans = self._locate(items, self._input_ids.to(embeds.device))
        pre_llm = hasattr(self.pruner, "prune_image")
        prompts = self._prompts(embeds, mask, items) if self._reads_prompt else {}
        for span, item in zip(spans, items):
            item.embeds = item.embeds.to(embeds.device, embeds.dtype)
            item.prompt = prompts.get(item.sample)
            if pre_llm:
                span.selection = self.pruner.prune_image(item)
        if embeds.is_cuda:
            torch.cuda.synchronize(embeds.device)
        selection_ms = (time.perf_counter() - started) * 1000.0

        new_embeds, new_mask, new_positions, layout = compact_prefill(
            embeds, mask, kwargs.get("position_ids"), spans, self.policy)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and use_cache:
            # Created here (not inside the model) so this prefill's layout can be tied to it for the decode steps.
            cache = upstream.new_cache(module.config)
            kwargs[self._cache_argument] = cache
        if cache is not None:
            self._layouts = {k: v for k, v in self._layouts.items() if v[0]() is not None}
            self._layouts[id(cache)] = (weakref.ref(cache), layout, [])
        kwargs.update(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions)
        blocks = self.adapter.mask_blocks(self._arguments, layout.source, layout.compact_mask)
        if mapped:  # the multimodal model prepared the per-kind masks: rebuilt for the compacted prompt
            kwargs["attention_mask"] = upstream.mask_mapping(module, new_embeds, new_mask, cache, blocks)
        if not layout.identity:
            self.adapter.compact_language_model_kwargs(kwargs, layout.source, layout.compact_mask)
        self._output_index = layout.carries.masked_fill(~layout.compact_mask, -1)
        self.pruner._stats = self._stats(spans, items, selection_ms)
        if self._reads_prompt:  # the selection depends on the prompt: what it read, per sample
            self.pruner._stats["reads_prompt"] = True
            for sample, prompt in prompts.items():
                self.pruner._stats["samples"][sample]["instruction"] = {
                    "tokens": int(prompt.instruction.sum()), "located": prompt.located, "text": prompt.text}
        if self.runner is not None:
            tracks = [ItemTrack(sample=span.sample, index_in_sample=item.index_in_sample, modality=item.modality,
                                positions=layout.destinations(span.sample, span.output_slots()),
                                original=span.selection.slots.to(embeds.device), segments=item.segments)
                      for span, item in zip(spans, items)]
            counts = self.runner.plan(tracks)
            record = self.runner.start_prefill(cache, new_mask, new_positions, new_embeds.shape, tracks, counts,
                                               blocks)
            self._pending = (cache, layout, (record, items))
        return kwargs

    def _prompts(self, embeds: torch.Tensor, mask: torch.Tensor | None, items: list[MediaItem]) -> dict:
        """Per sample that carries media, its :class:`~mmprune.prompt.PromptText` (one object for all its items)."""
        ids = self._input_ids.to(embeds.device)
        real = mask.to(embeds.device).bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        media = torch.isin(ids, torch.tensor(self._media_ids, device=ids.device))
        return {sample: prompt_text(ids[sample], embeds[sample], real[sample], media[sample], self._template,
                                    self._tokenizer)
                for sample in sorted({item.sample for item in items})}

    def _decode(self, kwargs: dict, layout: Layout, stages: list[StageLayout], cache: Any) -> dict:
        query = kwargs.get("inputs_embeds")
        if query is None:
            query = kwargs.get("input_ids")
        # the decoded steps, counted on the first layer that counts tokens; a stage at or before it shortened its
        # prompt (SEATS shrinks every layer's; a hybrid model's first attention layer may come after a stage)
        reference = upstream.length_layer(self.adapter.language_model)
        length = upstream.cache_length(cache, reference)
        covering = [stage for stage in stages if stage.layer <= reference]
        if covering:
            length += layout.compact_length - covering[-1].length
        given, mapped = self._mask_2d(kwargs.get("attention_mask"))
        mask, positions = decode_inputs(layout, length, int(query.shape[1]), given, kwargs.get("position_ids"))
        kwargs.update(attention_mask=mask, position_ids=positions)
        if mapped:
            kwargs["attention_mask"] = upstream.mask_mapping(self.adapter.language_model, kwargs["inputs_embeds"],
                                                             mask, cache)
        if self.runner is not None:
            self.runner.start_decode(cache, stages, layout.compact_length, mask, positions,
                                     length - layout.compact_length)
        return kwargs

    def _mask_2d(self, mask: Any) -> tuple[torch.Tensor | None, bool]:
        """The 2-D (batch, length) mask of the language model's input, and whether the model passed it prepared as
        a per-layer-kind mapping (Gemma 3's multimodal forward does: then the 2-D mask is its own argument)."""
        mapped = isinstance(mask, dict)
        if mapped:
            mask = self._arguments.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("mmprune needs the 2-D (batch, length) attention mask; got a prepared 4-D/dict mask "
                             "(static or compiled caches are not supported)")
        return mask, mapped

    def _locate(self, items: list[MediaItem], input_ids: torch.Tensor) -> list[ItemSpan]:
        """Assign each item its sequence positions: per modality, by its placeholder token, in the row-major order
        the model scatters that modality's features."""
        spans = []
        for modality in MODALITIES:
            of_modality = [item for item in items if item.modality == modality]
            if not of_modality:
                continue
            rows, cols = (input_ids == self.adapter.token_id(modality)).nonzero(as_tuple=True)
            total = sum(item.num_tokens for item in of_modality)
            if rows.numel() != total:
                raise ValueError(
                    f"input_ids hold {rows.numel()} {modality} tokens but the {modality}s produced {total} features; "
                    "generate() with num_beams > 1 or num_return_sequences > 1 repeats the prompt after the media "
                    "are encoded, which mmprune does not support")
            offset, per_sample = 0, {}
            for item in of_modality:
                n = item.num_tokens
                sample_rows = rows[offset:offset + n]
                sample = int(sample_rows[0])
                if bool((sample_rows != sample).any()):
                    raise ValueError(f"a {modality}'s tokens span two samples of the batch; check the prompt's "
                                     f"{modality} tokens")
                item.sample = sample
                item.index_in_sample = per_sample.get(sample, 0)
                per_sample[sample] = item.index_in_sample + 1
                spans.append(ItemSpan(sample=sample, positions=cols[offset:offset + n],
                                      selection=Selection.identity(n)))
                offset += n
        return spans

    def _stats(self, spans: list[ItemSpan], items: list[MediaItem], selection_ms: float) -> dict:
        batch = int(self._input_ids.shape[0])
        samples: list[dict] = [{LISTS[m]: [] for m in MODALITIES} for _ in range(batch)]
        for span, item in zip(spans, items):
            sel = span.selection
            entry = {
                "modality": item.modality,
                "before": item.num_tokens,
                "after": sel.count,
                "kept": sel.kept(),
                "merged": sel.merged,
                # the item's token layout: [start, rows, cols, newline-per-row] per grid
                "segments": [[g.start, g.rows, g.cols, g.newline] for g in item.segments],
            }
            if sel.note:
                entry["note"] = sel.note
            if item.has("encoder_tokens_per_layer"):  # in-tower pruning: tokens entering each encoder layer
                entry["encoder_tokens_per_layer"] = list(item.get("encoder_tokens_per_layer"))
            if item.modality == "video":
                frames = item.frames
                entry["frames"] = [len(frames), frames[0].rows, frames[0].cols]
                entry["frame_times"] = [f.time for f in frames]
                entry["kept_per_frame"] = per_frame(entry["kept"], frames)
            if item.modality == "audio":  # token i covers [i, i + 1) * token_seconds from the clip's start
                entry["token_seconds"] = item.token_seconds
                entry["seconds"] = item.num_tokens * item.token_seconds if item.token_seconds else None
            samples[span.sample][LISTS[item.modality]].append(entry)
        layers = self.adapter.num_layers
        for sample in samples:
            entries = [e for m in MODALITIES for e in sample[LISTS[m]]]
            sample["visual_tokens_before"] = sum(e["before"] for e in entries)
            sample["visual_tokens_after"] = sum(e["after"] for e in entries)
            sample["tokens_per_layer"] = [sample["visual_tokens_after"]] * layers
            sample["tokens_per_layer_by_modality"] = {
                m: [sum(e["after"] for e in sample[LISTS[m]])] * layers for m in MODALITIES if sample[LISTS[m]]}
            sample["equivalent_tokens"] = float(sample["visual_tokens_after"])
        return {
            "method": self.pruner.name,
            "stage": self.pruner.stage,
            "family": self.adapter.family,
            "keep": self.pruner.keep,
            "positions": self.policy,
            "num_layers": layers,
            "samples": samples,
            "selection_ms": selection_ms,
            "selection_ms_per_stage": {"pre-llm": selection_ms},
        }

    def _add_stage_stats(self, pending: tuple) -> None:
        """Per-layer visual token counts, equivalent average tokens and per-stage timing of an in-LLM prefill."""
        record, items = pending
        stats = self.pruner._stats
        layers = self.adapter.num_layers
        for sample in stats["samples"]:
            sample["tokens_per_layer"] = [0] * layers
            sample["tokens_per_layer_by_modality"] = {m: [0] * layers for m in sample["tokens_per_layer_by_modality"]}
        for index, item in enumerate(items):
            sample = stats["samples"][item.sample]
            entry = sample[LISTS[item.modality]][item.index_in_sample]
            entry["stages"] = [{"layer": layer, "kept": kept[index]} for layer, kept in zip(record.layers,
                                                                                          record.kept)]
            if item.modality == "video":
                entry["kept_per_frame"] = per_frame(kept_at_last_layer(entry), item.frames)
            current = entry["after"]
            for layer in range(layers):
                for stage, stage_layer in enumerate(record.layers):
                    if stage_layer == layer:
                        current = len(record.kept[stage][index])
                sample["tokens_per_layer"][layer] += current
                sample["tokens_per_layer_by_modality"][item.modality][layer] += current
        for sample in stats["samples"]:
            sample["visual_tokens_llm_input"] = sample["visual_tokens_after"]
            sample["visual_tokens_after"] = sample["tokens_per_layer"][-1]
            sample["equivalent_tokens"] = sum(sample["tokens_per_layer"]) / layers
        stats["stage_layers"] = list(record.layers)
        stats["schedule"] = self.pruner.describe_schedule()
        for layer, ms in zip(record.layers, record.selection_ms):
            stats["selection_ms_per_stage"][f"layer {layer}"] = ms
        stats["selection_ms"] = sum(stats["selection_ms_per_stage"].values())


_VERIFIED: weakref.WeakSet = weakref.WeakSet()


def _verify_once(adapter: Any) -> None:
    """Check mmprune's assumptions about transformers internals on this model (once per model object)."""
    if adapter.model not in _VERIFIED:
        upstream.verify(adapter)
        _VERIFIED.add(adapter.model)


LISTS = {"image": "images", "video": "videos", "audio": "audios"}  # the per-sample stats list of each modality


def per_frame(kept: list[int], frames: list) -> list[int]:
    """How many of ``kept`` (item-level token indices) fall in each of a video's temporal grids."""
    return [sum(1 for k in kept if f.start <= k < f.start + f.size) for f in frames]


def kept_at_last_layer(entry: dict) -> list[int]:
    """One item's stats entry: the original token indices that reach the last decoder layer."""
    return entry["stages"][-1]["kept"] if entry.get("stages") else entry["kept"]


def final_kept(stats: dict, modality: str = "image") -> list[list[list[int]]]:
    """Per sample, per item of ``modality`` (images by default): original token indices that reach the last
    decoder layer (after every stage)."""
    return [[kept_at_last_layer(item) for item in sample.get(LISTS[modality], [])] for sample in stats["samples"]]
