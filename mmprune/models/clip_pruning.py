"""Token pruning inside a CLIP vision tower (FlowCut): hooks that shorten the sequence between encoder layers.

The method decides (``pruner.encoder_start`` / ``pruner.encoder_layer``, pure tensor logic); this module runs it:

* the tower's ``forward`` is shadowed (an instance attribute, restored on detach) so that each image goes through
  the tower alone: images keep different numbers of tokens at intermediate layers, and one image per call keeps
  every attention implementation (SDPA, FlashAttention) unchanged, with no padding mask inside the tower. The
  per-image outputs are joined back into one batch output (:func:`join_outputs`);
* a forward pre-hook on each encoder layer shortens its input to the tokens the previous layer kept ([CLS] first,
  then the kept patches in original order) and records how many tokens enter the layer;
* forward hooks on the ``q_proj`` / ``k_proj`` / ``v_proj`` of the layers before the feature layer record their
  outputs (the projections the layer computes anyway), and a forward hook on each such layer hands them to the
  method, whose answer the next layer's pre-hook applies.

After the tower, ``adapter.captured`` holds per crop ``encoder_kept`` (the original patch indices that reached the
feature layer) and ``encoder_counts`` (tokens entering each encoder layer, [CLS] included). Every transformers
detail (layer arguments, projection layout, output structure) is read through :mod:`mmprune.upstream`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmprune import upstream


@dataclass
class _Run:
    """One image's pass through the tower."""

    budget: Callable[[int], int]  # patches -> patches that reach the feature layer
    state: Any = None  # the method's state (None: nothing to prune)
    alive: torch.Tensor | None = None  # original token index ([CLS] = 0, patch p = p + 1) of each current token
    alive_in: list[torch.Tensor] = field(default_factory=list)  # per layer, the tokens entering it
    pending: torch.Tensor | None = None  # patches (current indices) the next layer keeps
    layer: int = -1
    projections: dict[str, torch.Tensor] = field(default_factory=dict)


class _Restore:
    """A removable handle (like torch's hook handles) that puts back a shadowed ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward", _MISSING)

    def remove(self) -> None:
        if self.module is None:
            return
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous
        self.module = None


_MISSING = object()


class ClipEncoderPruning:
    """The hooks of one attachment; :meth:`install` returns their handles (the session removes them on detach)."""

    def __init__(self, adapter: Any, pruner: Any, tower: nn.Module, feature_index: int, with_cls: bool) -> None:
        self.adapter = adapter
        self.pruner = pruner
        self.tower = tower
        self.layers = upstream.clip_encoder_layers(tower)
        self.feature_index = feature_index  # encoder layer whose output is the feature layer
        self.with_cls = with_cls  # the LLM also receives [CLS] ("full" strategy): it is one of the k tokens
        self.run: _Run | None = None

    # ------------------------------------------------------------------ install
    def install(self) -> list:
        handles: list = []
        try:
            for index, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(self._entering(index), with_kwargs=True))
                if index < self.feature_index:
                    for name, projection in upstream.clip_value_projections(layer).items():
                        handles.append(projection.register_forward_hook(self._projected(index, name)))
                    handles.append(layer.register_forward_hook(self._after(index)))
            original = self.tower.forward
            handles.append(_Restore(self.tower))
            self.tower.forward = self._per_image(original)
        except Exception:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _budget(self, patches: int) -> int:
        tokens = patches + int(self.with_cls)
        return self.pruner.pre_llm_budget(tokens, "image") - int(self.with_cls)

    # ------------------------------------------------------------------ the tower, one image at a time
    def _per_image(self, original: Callable) -> Callable:
        def forward(pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            outputs, runs = [], []
            for image in range(pixel_values.shape[0]):
                self.run = _Run(budget=self._budget)
                try:
                    outputs.append(original(pixel_values[image:image + 1], *args, **kwargs))
                finally:
                    run, self.run = self.run, None
                if run.alive is None:
                    raise upstream.mismatch("the CLIP tower runs its encoder layers as modules",
                                            "no encoder layer ran during the tower's forward")
                runs.append(run)
            store = self.adapter.captured
            store.setdefault("encoder_kept", []).extend(run.alive[1:] - 1 for run in runs)
            store.setdefault("encoder_counts", []).extend([int(t.numel()) for t in run.alive_in] for run in runs)
            if len(outputs) == 1:
                return outputs[0]
            return join_outputs(outputs, [run.alive_in for run in runs], int(runs[0].alive_in[0].numel()))

        return forward

    # ------------------------------------------------------------------ the hooks
    def _entering(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self.run
            if run is None:
                return None
            hidden = upstream.clip_layer_hidden(args, kwargs)
            changed = False
            if index == 0:
                patches = hidden.shape[1] - 1
                run.state = self.pruner.encoder_start(patches, run.budget(patches), self.feature_index)
                run.alive = torch.arange(hidden.shape[1], device=hidden.device)
            if run.pending is not None:
                keep = run.pending.to(hidden.device)
                hidden = torch.cat([hidden[:, :1], hidden[:, 1:].index_select(1, keep)], dim=1)
                run.alive = torch.cat([run.alive[:1], run.alive[1:][keep]])
                run.pending, changed = None, True
            run.alive_in.append(run.alive)
            run.layer = index
            run.projections = {}
            return upstream.with_clip_layer_hidden(args, kwargs, hidden) if changed else None

        return hook

    def _projected(self, index: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            run = self.run
            if run is not None and run.state is not None and run.layer == index:
                run.projections[name] = output

        return hook

    def _after(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            run = self.run
            if run is None or run.state is None or run.layer != index:
                return
            if sorted(run.projections) != ["k", "q", "v"]:
                raise upstream.mismatch("CLIP attention calls its q_proj, k_proj and v_proj modules",
                                        f"encoder layer {index} called {sorted(run.projections) or 'none'}")
            q, k, v = upstream.clip_heads(module, run.projections)
            with torch.no_grad():
                keep = self.pruner.encoder_layer(run.state, index, q[0, :, 0], k[0], v[0],
                                                 upstream.clip_attention(module).scale)
            run.projections = {}
            if keep is not None and keep.numel() < run.alive.numel() - 1:
                run.pending = keep

        return hook


def join_outputs(outputs: list, alive_in: list[list[torch.Tensor]], length: int) -> Any:
    """One batch output from per-image tower outputs. Tensors of equal shapes are concatenated along the batch;
    hidden states of different lengths (images that kept different counts at that layer) are put back at full
    ``length`` with zeros at the pruned tokens (``hidden_states[j]`` holds the tokens entering layer ``max(j-1,
    0)``); other outputs of different shapes (attention maps) cannot be joined and raise."""
    fields = [upstream.tower_output_fields(output) for output in outputs]
    joined: dict[str, Any] = {}
    for name, first in fields[0].items():
        values = [f[name] for f in fields]
        if isinstance(first, (tuple, list)):
            joined[name] = tuple(_join([v[j] for v in values], name, [a[max(j - 1, 0)] for a in alive_in], length)
                                 for j in range(len(first)))
        else:
            joined[name] = _join(values, name, None, length)
    return upstream.rebuild_tower_output(outputs[0], joined)


def _join(values: list, name: str, alive: list[torch.Tensor] | None, length: int) -> Any:
    if any(v is None for v in values) or not isinstance(values[0], torch.Tensor):
        return values[0] if all(v is None for v in values) else values
    if all(v.shape == values[0].shape for v in values):
        return torch.cat(values, dim=0)
    if name != "hidden_states" or alive is None:
        raise ValueError(f"flowcut encodes each image alone and cannot join the tower's {name} of images that kept "
                         "different numbers of tokens; do not request them while FlowCut is attached")
    full = []
    for value, tokens in zip(values, alive):
        out = value.new_zeros(1, length, *value.shape[2:])
        out[:, tokens.to(value.device)] = value
        full.append(out)
    return torch.cat(full, dim=0)
