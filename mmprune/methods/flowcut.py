"""FlowCut: progressive pruning inside the CLIP vision encoder, scored by information flow through [CLS]."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner

# Why each family other than LLaVA-1.5 is refused (adapter family names).
REFUSED = {
    "llava-next": "the reference prunes half of the budget per crop inside the ViT and the rest at LLM layer 1, "
                  "then re-packs the surviving anyres tokens around newline tokens; that second stage and the "
                  "re-packing are not implemented",
    "llava-next-video": "the reference has no video path, and LLaVA-NeXT's anyres images need its second stage at "
                        "LLM layer 1, which is not implemented",
    "llava-onevision": "its SigLIP tower has no [CLS] token, from which every FlowCut score is computed",
    "qwen2-vl": "the reference's Qwen2-VL variant (FlowCut_Qwen) prunes variable-length windowed vision sequences "
                "at batch size 1 and again at LLM layer 1; it is not implemented (the tower has no [CLS])",
    "qwen3-vl": "the tower has no [CLS] token and DeepStack feeds per-layer visual features to the LLM",
    "qwen2.5-omni": "the tower has no [CLS] token and the reference has no Omni variant",
    "qwen3-omni": "the tower has no [CLS] token and the reference has no Omni variant",
    "qwen3.5": "the tower has no [CLS] token and the reference has no Qwen3.5 variant",
}


@dataclass
class FlowCutState:
    """One image's pass through the encoder: what the next layer needs from the previous ones."""

    target: int  # tokens ([CLS] included) left after the last pruning layer
    feature_layer: int  # 0-based index of the encoder layer whose output is the feature layer
    scores: torch.Tensor | None = None  # the EMA of the patch scores, over the patches still in the sequence
    decisions: list[dict] = field(default_factory=list)  # per pruning layer: layer, before, after (tokens)


@dataclass
class FlowCutPruner(PreLLMPruner):
    """Progressive [CLS]-flow pruning between the CLIP encoder layers, up to the feature layer.

    Paper: "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models" (NeurIPS 2025)
    (arXiv 2505.19536); reference code TungChintao/FlowCut (``flowcut/modeling_clip_flowcut.py``,
    ``flowcut/utils_flowcut.py``, ``flowcut/main.py``).

    Rule (as the code), with ``f`` the encoder layer whose output LLaVA reads (``vision_feature_layer=-2``: layer
    ``L - 2``, the reference's ``select_layer``) and ``T = k + 1`` tokens ([CLS] + ``k`` patches) the target:

    * every encoder layer ``l`` whose input still holds more than ``T`` tokens scores its patches from its own
      attention on that input: ``a`` = head-mean [CLS] attention row (softmax over all tokens, [CLS] included,
      then the patch columns), ``sem`` = head-mean of ``softmax_j(v_cls . v_j)`` (the **unscaled** value-value
      products, softmax over all tokens, patch columns), ``v`` = head-mean value vectors;
      ``s = (a / sum a + sem / sum sem) * ||v||_1``. The scores accumulate as ``c = s`` (first layer) then
      ``c = 0.5 c + 0.5 s``;
    * the layer prunes only when ``rpl = f - l - 1`` is even: ``rpl > 0`` removes
      ``round((n - (T - 1)) / sqrt(rpl) * (1 - (H / log n)^2))`` patches (``n`` patches now, ``H`` the entropy of
      ``a / sum a``, rounding half to even), never going below ``T``; ``rpl = 0`` (layer ``f - 1``) prunes to ``T``.
      The ``n' - 1`` patches with the largest ``c`` stay, in original order, after [CLS]; ``c`` follows them;
    * the layer's output (its full residual block ran on the ``n + 1`` tokens) is shortened, so the next layers,
      the feature layer among them, run on the kept tokens only; the LLM receives the feature layer's ``k`` patches.

    The vision encoder therefore costs less (its per-layer token counts are in the stats entry of each image,
    ``encoder_tokens_per_layer``, and the FLOPs model counts them). ``keep`` is the budget ``k`` (the reference's
    ``target_num``: 64/128/192 of 576); ``keep=1.0`` prunes nothing.

    Deliberate differences:
      * batches: the reference uses one count per layer for the whole batch (the largest of the images' counts);
        here each image follows its own entropy, so the images of a batch are encoded one at a time (the tower is
        called once per image) and a batch equals each image alone;
      * ties in the top-``k`` of ``c`` keep the lower index (``torch.topk``'s order among ties is unspecified);
      * scores, entropy and counts are computed in float32 (the reference: the model's dtype), and ``0 log 0`` counts
        as 0 (the reference gets NaN where an attention probability underflows to 0);
      * ``vision_feature_select_strategy="full"`` (the LLM also receives [CLS]) counts [CLS] among the ``k`` tokens,
        as the reference's ``cls_patch`` mode does; any single ``vision_feature_layer`` with a layer before it is
        honoured (the reference hard-codes ``L - 2``);
      * families: LLaVA-1.5 only. LLaVA-NeXT (half the budget in the ViT, the rest at LLM layer 1), Qwen2-VL and the
        towers without [CLS] are refused at attach, each with its reason (``REFUSED``); so are videos.
    """

    keep: int | float = 0.25

    name: ClassVar[str] = "flowcut"
    summary: ClassVar[str] = "progressive pruning inside the CLIP encoder by [CLS] information flow (FlowCut)"
    families: ClassVar[tuple[str, ...]] = ("llava",)
    prunes_in_encoder: ClassVar[bool] = True  # the adapter installs encoder hooks that call encoder_start/layer

    def check_family(self, family: str) -> None:
        if family not in self.families:
            reason = REFUSED.get(family, "only LLaVA-1.5's CLIP tower is supported")
            raise ValueError(f"{self.name} prunes inside the CLIP vision encoder and supports LLaVA-1.5 (family "
                             f"'llava') only; {family} is refused: {reason}")

    # ------------------------------------------------------------------ inside the encoder
    def encoder_start(self, patches: int, kept_patches: int, feature_layer: int) -> FlowCutState | None:
        """The state of one image entering the encoder with ``patches`` patches (and [CLS]) of which
        ``kept_patches`` reach the feature layer (encoder layer ``feature_layer``); ``None`` when nothing is pruned."""
        if kept_patches >= patches:
            return None
        if feature_layer < 1:
            raise ValueError(f"{self.name} needs at least one encoder layer before the feature layer to prune at "
                             f"(the feature layer is encoder layer {feature_layer})")
        return FlowCutState(target=kept_patches + 1, feature_layer=feature_layer)

    def encoder_layer(self, state: FlowCutState, layer: int, q_cls: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, scale: float) -> torch.Tensor | None:
        """Encoder ``layer`` ran on the current tokens ([CLS] first); ``q_cls`` ``(heads, d)`` is [CLS]'s query,
        ``keys`` / ``values`` ``(heads, L, d)`` the layer's keys and values (before the attention's scaling).
        Returns the indices (among the current patches, ascending) that go on after this layer, or ``None`` to keep
        them all."""
        length = keys.shape[1]
        rpl = state.feature_layer - layer - 1
        if length <= state.target or rpl < 0:
            return None
        q_cls, keys, values = q_cls.float(), keys.float(), values.float()
        attention = ((keys @ q_cls.unsqueeze(-1)).squeeze(-1) * scale).softmax(dim=-1).mean(0)[1:]
        semantic = (values @ values[:, 0].unsqueeze(-1)).squeeze(-1).softmax(dim=-1).mean(0)[1:]
        score = flow_scores(attention, semantic, values.mean(0)[1:])
        state.scores = score if state.scores is None else 0.5 * state.scores + 0.5 * score
        if rpl % 2:
            return None
        pruned = prune_count(attention, rpl, state.target - 1) if rpl else length
        after = max(length - pruned, state.target)
        order = torch.sort(state.scores, descending=True, stable=True).indices[:after - 1]
        keep = torch.sort(order).values
        state.scores = state.scores[keep]
        state.decisions.append({"layer": layer, "before": length, "after": after})
        return keep

    # ------------------------------------------------------------------ after the encoder
    def select(self, tokens: MediaItem, k: int) -> Selection:
        if not tokens.has("encoder_kept"):
            raise RuntimeError(f"{self.name}: the image was not encoded through FlowCut's encoder hooks (attach the "
                               "pruner to the model before encoding the image)")
        kept = tokens.get("encoder_kept")
        if kept.numel() != k:
            raise RuntimeError(f"{self.name}: the encoder kept {kept.numel()} tokens of this image for a budget of {k}")
        return Selection.of(kept.to(tokens.embeds.device))


def flow_scores(attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(a / sum a + sem / sum sem) * ||v||_1`` per patch: ``attention`` / ``semantic`` ``(n,)`` head-mean [CLS]
    rows, ``values`` ``(n, d)`` head-mean value vectors."""
    return (attention / attention.sum() + semantic / semantic.sum()) * values.abs().sum(dim=-1)


def prune_count(attention: torch.Tensor, remaining: int, target_patches: int) -> int:
    """Patches a layer with ``remaining`` (even, > 0) pruning layers left removes:
    ``round((n - target) / sqrt(remaining) * (1 - (H / log n)^2))``, ``H`` the entropy of the normalised head-mean
    [CLS] row ``attention`` ``(n,)`` over the ``n`` patches (half to even, as ``torch.round``)."""
    n = attention.numel()
    prob = attention.float() / attention.float().sum()
    entropy = -torch.special.xlogy(prob, prob).sum()
    ratio = entropy / math.log(n) if n > 1 else torch.ones(())
    r = (n - target_patches) / math.sqrt(remaining) * (1 - ratio**2)
    return int(torch.round(r))
