"""Reference-style implementations of two mmprune methods, timed beside them by ``mmprune bench --speed
--side-by-side``.

Each computes the selection of the mmprune method of the same name the way that method's reference code computes
it (written here from reading that code; nothing is copied), so a reference-style row and its mmprune row time one
selection done two ways. The speed bench checks on every timed prompt that both keep the same tokens.

* **FastV** (pkunlp-icler/FastV, ``fastv_forward`` in its patched ``modeling_llama.py`` of the LLaVA-HF port): the
  decoder layers run one by one; layer ``K-1`` is asked for its attention weights, which makes its attention
  eager (transformers' SDPA attention fell back to eager for such a call; FlashAttention returns none); the last
  token's row of those weights, averaged over heads, restricted to the image span, top-``k``; the hidden states
  and position ids keep the chosen image tokens and every text token in their original order (its "inplace" mode:
  original position ids), and layers ``K``.. run on them. One prompt at a time: the reference reads sample 0 and one
  image span.
* **FasterVLM** (Theia-4869/FasterVLM, ``CLIPVisionTower.forward`` and ``LlavaMetaForCausalLM.encode_images``): the
  CLIP tower runs with ``output_attentions=True`` (eager attention in every layer, every layer's weights kept); the
  [CLS] row of the feature layer's weights, averaged over heads, top-``k``; every patch is projected and the kept
  ones enter the prompt in their original order, positions renumbered. Prompts may be batched (one image each).

Both run on LLaVA-1.5 (``LlavaForConditionalGeneration``, one image per prompt, a CLIP tower with [CLS] and
``vision_feature_select_strategy="default"``), the family their reference code is written for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmprune import upstream


@dataclass
class ReferenceRun:
    logits: torch.Tensor  # (B, 1, vocab): the last position's, as generate's prefill computes them
    kept: list[list[int]]  # per prompt, the kept token indices of its image (ascending)


def check_llava(model, what: str) -> None:
    config = model.config
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(f"the {what} reference-style implementation runs LLaVA-1.5 "
                         f"(LlavaForConditionalGeneration), not {type(model).__name__}")
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise ValueError(f"the {what} reference-style implementation needs one integer vision_feature_layer and "
                         f"vision_feature_select_strategy='default'; this model has {config.vision_feature_layer!r} "
                         f"and {config.vision_feature_select_strategy!r}")


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each prompt's image placeholder tokens, which must be one contiguous span."""
    spans = []
    for row in input_ids:
        where = (row == image_token_id).nonzero().squeeze(1)
        if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError("reference-style implementations need exactly one image (one contiguous span of image "
                             "tokens) per prompt")
        spans.append((int(where[0]), int(where.numel())))
    return spans


def causal_additive_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, 1, L, L)``: 0 on and below the diagonal, the dtype's minimum above (what eager attention adds)."""
    return torch.full((length, length), torch.finfo(like.dtype).min, dtype=like.dtype,
                      device=like.device).triu(1)[None, None]


@torch.no_grad()
def fastv_reference(model, inputs: dict, k: int, layer: int = 2) -> ReferenceRun:
    """FastV on one prompt as its reference code runs it (see the module docstring): ``k`` image tokens go on from
    decoder layer ``layer`` (K)."""
    check_llava(model, "FastV")
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"the FastV reference runs one prompt at a time (it reads sample 0); got {ids.shape[0]}")
    config, inner = model.config, model.model
    lm = inner.language_model
    layers = upstream.decoder_layers(lm)
    if not 1 <= layer < len(layers):
        raise ValueError(f"FastV's K={layer} is outside 1..{len(layers) - 1}")
    (start, count), = image_spans(ids, config.image_token_id)
    if not 1 <= k <= count:
        raise ValueError(f"k={k} image tokens of {count}")
    features = upstream.image_features(inner.get_image_features(
        pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy))[0]
    hidden = inner.get_input_embeddings()(ids)
    hidden[0, start:start + count] = features.to(hidden.dtype)
    length = hidden.shape[1]
    positions = torch.arange(length, device=hidden.device)[None]
    rope = upstream.rotary_embedding(lm, hidden, positions)
    cache = upstream.new_cache(lm.config)
    cache_name = upstream.cache_argument(layers[0].forward)
    masked = not upstream.runs_causal_without_mask(lm.config)  # an eager model needs its causal mask everywhere
    captured: dict[str, torch.Tensor] = {}
    chosen = None
    for index, decoder_layer in enumerate(layers):
        if index == layer:  # prune: the last token's head-mean attention row over the image, top-k
            row = captured.pop("weights")[0].float().mean(dim=0)[-1, start:start + count]
            chosen = row.topk(k).indices.sort().values
            keep = torch.cat([torch.arange(start, device=hidden.device), chosen + start,
                              torch.arange(start + count, length, device=hidden.device)])
            hidden, positions = hidden[:, keep], positions[:, keep]  # original position ids (inplace mode)
            rope = upstream.rotary_embedding(lm, hidden, positions)
        arguments = {"attention_mask": causal_additive_mask(hidden.shape[1], hidden) if masked else None,
                     "position_ids": positions, "position_embeddings": rope, "use_cache": True, cache_name: cache}
        if index == layer - 1:  # the layer asked for its attention weights: eager attention
            attention = decoder_layer.self_attn
            handle = attention.register_forward_hook(
                lambda module, args, output: captured.__setitem__("weights", upstream.attention_weights(output)))
            try:
                with upstream.attention_implementation(attention.config, "eager"):
                    arguments["attention_mask"] = causal_additive_mask(hidden.shape[1], hidden)
                    hidden = upstream.decoder_layer_output(decoder_layer(hidden, **arguments))
            finally:
                handle.remove()
        else:
            hidden = upstream.decoder_layer_output(decoder_layer(hidden, **arguments))
    logits = model.get_output_embeddings()(upstream.final_norm(lm)(hidden[:, -1:]))
    return ReferenceRun(logits=logits, kept=[chosen.tolist()])


@torch.no_grad()
def fastervlm_reference(model, inputs: dict, k: int) -> ReferenceRun:
    """FasterVLM on a batch of one-image prompts as its reference code runs it (see the module docstring)."""
    check_llava(model, "FasterVLM")
    config, inner = model.config, model.model
    ids = inputs["input_ids"]
    spans = image_spans(ids, config.image_token_id)
    feature_layer = config.vision_feature_layer
    hidden_states, attentions = upstream.tower_attentions(inner.vision_tower, inputs["pixel_values"])
    # hidden_states[f] is layer f-1's output (f > 0; [0] the embeddings); attentions[i] is layer i's weights
    weights = attentions[feature_layer if feature_layer < 0 else feature_layer - 1]
    scores = weights[:, :, 0, 1:].float().mean(dim=1)  # [CLS] row over the patches, head mean: (B, N)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} image tokens of {scores.shape[1]}")
    chosen = scores.topk(k, dim=1).indices.sort(dim=1).values  # kept in original order (its index mask)
    projected = inner.multi_modal_projector(hidden_states[feature_layer][:, 1:])  # every patch
    kept = projected.gather(1, chosen.unsqueeze(-1).expand(-1, -1, projected.shape[-1]))
    embeds = inner.get_input_embeddings()(ids)
    rows = [torch.cat([embeds[b, :start], kept[b].to(embeds.dtype), embeds[b, start + count:]])
            for b, (start, count) in enumerate(spans)]
    if len({row.shape[0] for row in rows}) != 1:
        raise ValueError("the FasterVLM reference-style batch needs prompts of one length")
    embeds = torch.stack(rows)
    out = inner.language_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                               device=embeds.device), use_cache=True)
    logits = model.get_output_embeddings()(out.last_hidden_state[:, -1:])
    return ReferenceRun(logits=logits, kept=chosen.tolist())


@dataclass(frozen=True)
class Reference:
    """A reference-style implementation of ``method``: ``run(model, inputs, pruner)``, and whether it takes a
    batch of prompts (else one at a time, as its reference code)."""

    method: str
    run: Callable[..., ReferenceRun]
    batched: bool
    source: str


def _fastv(model, inputs: dict, pruner) -> ReferenceRun:
    count = image_spans(inputs["input_ids"], model.config.image_token_id)[0][1]
    return fastv_reference(model, inputs, pruner.budget(count), layer=pruner.layer)


def _fastervlm(model, inputs: dict, pruner) -> ReferenceRun:
    count = image_spans(inputs["input_ids"], model.config.image_token_id)[0][1]
    return fastervlm_reference(model, inputs, pruner.pre_llm_budget(count))


REFERENCES = {
    "fastv": Reference("fastv", _fastv, batched=False,
                       source="pkunlp-icler/FastV: eager attention weights at layer K-1, batch 1"),
    "fastervlm": Reference("fastervlm", _fastervlm, batched=True,
                           source="Theia-4869/FasterVLM: CLIP tower with output_attentions (eager, every layer)"),
}


def supports(model, method: str) -> str | None:
    """Why ``method`` has no reference-style row on ``model``, or None when it has one."""
    if method not in REFERENCES:
        return f"no reference-style implementation of {method} (there are: {', '.join(REFERENCES)})"
    try:
        check_llava(model, method)
    except ValueError as exc:
        return str(exc)
    return None
