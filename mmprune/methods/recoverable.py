"""Recoverable Compression: [CLS]-attention outliers, then the tokens the question recovers, then the rest merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from mmprune.media import MediaItem, Selection
from mmprune.methods.base import PreLLMPruner
from mmprune.methods.params import Float, Int, param
from mmprune.methods.prumerge import REFERENCE_NEIGHBOURS, merge_inputs, prumerge_tokens

# scikit-learn's LocalOutlierFactor(contamination="auto"): a point is an outlier when its LOF exceeds 1.5
LOF_THRESHOLD = 1.5
# the code's text score in the merge: 50 * cos(text, patch) / sqrt(768), 768 the CLIP ViT-L/14-336 projection width
REFERENCE_TEXT_WEIGHT = 50 / 768 ** 0.5


def lof_outliers(values: torch.Tensor, neighbours: int, threshold: float = LOF_THRESHOLD) -> int:
    """How many of the scalars ``values`` are local outliers: scikit-learn's ``LocalOutlierFactor(n_neighbors=
    neighbours, contamination="auto").fit_predict`` on the column ``values[:, None]``, counted.

    Each point's ``min(neighbours, n - 1)`` nearest other points (absolute difference; ties to the lower index) give
    its k-distance and its local reachability density ``lrd_i = 1 / (mean_j max(d_ij, kdist_j) + 1e-10)``; a point
    is an outlier when ``mean_j lrd_j / lrd_i > threshold``. Float64, as scikit-learn's trees. Fewer than two
    points: none.
    """
    v = values.reshape(-1).double()
    n = v.numel()
    if n < 2:
        return 0
    k = max(1, min(neighbours, n - 1))
    distance = (v.unsqueeze(1) - v.unsqueeze(0)).abs()
    distance.fill_diagonal_(float("inf"))  # a point is not its own neighbour
    nearest, neighbour = torch.sort(distance, dim=1, stable=True)
    nearest, neighbour = nearest[:, :k], neighbour[:, :k]
    k_distance = nearest[:, -1]
    reach = torch.maximum(nearest, k_distance[neighbour])
    density = 1.0 / (reach.mean(dim=1) + 1e-10)
    factor = density[neighbour].mean(dim=1) / density
    return int((factor > threshold).sum())


def question_similarity(embeds: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """``(N,)`` cosine between each visual embedding and the question vector: the mean of the instruction tokens'
    L2-normalised input embeddings (one vector for the question, as the reference's one CLIP text embedding)."""
    question = F.normalize(instruction.float(), dim=-1).mean(dim=0, keepdim=True)
    return F.cosine_similarity(embeds.float(), question.to(embeds.device), dim=-1)


@dataclass
class RecoverablePruner(PreLLMPruner):
    """Visual outliers by [CLS] attention, plus the tokens most similar to the question (recovered), plus the
    remaining tokens merged into a few centres; every count decided per image by local outlier factors.

    Paper: "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information" (Chen
    et al., AAAI 2025, arXiv 2409.01179). Reference code: banjiuyufen/RecoverableCompression (Apache-2.0), read in
    the fork DamonZhao-sfu/RecoverableCompression at the authors' upload 5967da7:
    ``llava/model/multimodal_encoder/clip_encoder.py``, ``token_recycling_with_text_in_vision_and_clustring`` (the
    path its ``forward`` runs). Own code.

    Rule (as the code, LLaVA-1.5, ``n`` = 576 patches):
      1. Visual scorer: ``a``, the last CLIP layer's single-head [CLS] attention over the full width
         (``softmax(q_cls k^T / sqrt(1024))`` of the hooked ``q_proj`` / ``k_proj``, [CLS]'s own entry dropped; the
         same statistic as LLaVA-PruMerge). The ``n_v`` LOF outliers of ``a`` (``visual_lof_neighbours`` = 20) are
         kept: the ``n_v`` highest ``a``.
      2. Recovery: ``t`` = question-patch similarity; ``t`` of the kept tokens is set to ``min t``, and with ``c_t``
         LOF outliers of that (20 neighbours) the ``floor((n - n_v) c_t / n)`` remaining tokens of highest ``t`` are
         kept too. Steps 1 and 2 give the kept originals, in ascending index order.
      3. Merge of the rest ``R``: the ``c_o`` LOF outliers of ``a`` over ``R`` (``rest_lof_neighbours`` = 10, the
         code's default) are centres, by descending ``a``. Centre ``i`` becomes ``x_i + sum_j a_j x_j`` over its
         ``merge_neighbours`` (32) other tokens of ``R`` (centres or not) of highest
         ``cos(key_i, key_j) + text_weight * t_j`` (keys: the last layer's full-width ``k_proj``); ``a``
         unnormalised, ``x`` the penultimate-layer (pre-projector) features, every update reading unmerged ones.
         One extra token ``sum_{j in R, not a centre} a_j x_j`` follows; with no centre, neither it nor the rest
         enters the LLM.
    Output, in the code's order: the kept originals (ascending), the merged centres (descending ``a``), the extra
    token (its slot: the non-centre of highest ``a``); centres and extra token go through the model's projector.
    The paper reports 10% of the tokens on average.

    ``keep`` is an **upper bound** (``keep_means``), 50% by default: the visual outliers take places first (highest
    ``a``), then the recovered tokens (highest ``t``), then centres (highest ``a``, one place left for the extra
    token); ``after`` in ``stats`` is the real count, and the image's ``note`` gives every stage's count.

    Deliberate differences:
      * Text similarity: the code embeds the question's first line with CLIP's text tower (``text_projection`` of
        the last position of its 77-token padded sequence) and compares it with CLIP's projected patch tokens
        (``visual_projection`` of the last layer), scaled by ``1/sqrt(768)``. Here no CLIP text tower is loaded:
        ``t`` is the cosine between each visual token's LLM input embedding and the mean of the L2-normalised
        LLM input embeddings of the whole instruction (``prompt.instruction_embeds``; see
        :mod:`mmprune.prompt`). The LOF counts do not depend on the scale of ``t``; the merge does, through
        ``text_weight``, which keeps the code's weight per unit cosine (``50 / sqrt(768)``), though LLM-space
        cosines between visual and word embeddings are on another scale than CLIP's.
      * Centre count: the code takes ``int(C * c_o / |R|)`` centres, where ``C`` is the tower's width (1024: the
        variable ``N`` is reassigned to ``index.shape[-1]``, the hidden width, before that ``topk``), about twice
        the outliers on LLaVA-1.5. Here the count is ``c_o``, the outliers themselves, as in steps 1 and 2.
      * Keys in the merge: the code gathers them with positions *within* ``R`` from the table of all patches
        (``Key_wo_cls`` indexed by ``idx`` / ``compl``), i.e. the ``p``-th remaining token is compared through
        patch ``p``'s key; here each token uses its own key.
      * Counts as integers: ``n_v`` is the outlier count (the code's ``int(n * (c / n))`` can fall one short
        through float rounding), step 2 is the exact floor. LOF's neighbours tie to the lower index
        (scikit-learn's KD-tree leaves ties unspecified); ``topk`` ties go to the earlier token; step 2 never
        re-picks a step-1 token (the code's ``topk`` could, on ties at ``min t``).
      * No kept original and no centre (flat scores): the code passes no visual token at all; here the token of
        highest ``a`` is kept.
      * Float32 attention, similarities and merging; batches of any size, each image on its own (the code
        assumes a batch of one); fewer than 32 other tokens: all of them are neighbours.
      * LLaVA-NeXT (the code prunes single 336 px images): as PruMerge here, each packed token's ``a`` and key come
        from its own crop; one selection over the whole image's patches; newline tokens are never counted, kept
        nor merged. InternVL3 likewise over its tiles, a token (a 2 x 2 patch group) taking the adapter's summed
        [CLS] attention and mean key of its patches and merging its pixel-shuffled features.
      * Towers without [CLS] (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision): ``a`` is the head-mean attention each token
        receives (``token_attention``), keys the adapter's ``vision_keys``, and the merge runs on the LLM-input
        embeddings (no pre-projector features): the substitutes PruMerge uses, not the paper's rule.
    """

    keep: int | float = 0.5
    visual_lof_neighbours: int = param(20, Int(1), "LOF neighbours of the [CLS]-attention outlier count (step 1)")
    text_lof_neighbours: int = param(20, Int(1), "LOF neighbours of the question-similarity outlier count (step 2)")
    rest_lof_neighbours: int = param(10, Int(1), "LOF neighbours of the merge-centre count over the rest (step 3)")
    merge_neighbours: int = param(REFERENCE_NEIGHBOURS, Int(1), "tokens merged into each centre")
    text_weight: float = param(REFERENCE_TEXT_WEIGHT, Float(0.0),
                               "weight of a token's question similarity when ranking a centre's merge neighbours")

    name: ClassVar[str] = "recoverable"
    summary: ClassVar[str] = ("[CLS]-attention LOF outliers, plus tokens recovered by question similarity, plus the "
                              "rest merged into LOF-counted centres (Recoverable Compression)")
    keep_means: ClassVar[str] = "most visual tokens kept per image (local outlier counts decide)"
    variable_counts: ClassVar[bool] = True
    reads_prompt: ClassVar[bool] = True
    encoder_fields: ClassVar[tuple[str, ...]] = ("last_layer_cls_attention", "last_layer_keys")

    def select(self, tokens: MediaItem, k: int) -> Selection:
        prompt = self.prompt_of(tokens)
        device = tokens.embeds.device
        # newline tokens carry no attention: never counted, kept nor merged
        index = tokens.patch_indices()  # candidate position -> token index
        attention, keys, features, pre_projector = merge_inputs(tokens)
        a = attention.float().to(device)[index]
        t = question_similarity(tokens.embeds[index], prompt.instruction_embeds.to(device))
        n = index.numel()

        # 1. visual outliers, by descending attention
        n_visual = lof_outliers(a, self.visual_lof_neighbours)
        visual = torch.argsort(a, descending=True, stable=True)[:n_visual]
        # 2. recovery: the kept tokens' similarity is lowered to the minimum before the count
        lowered = t.clone()
        lowered[visual] = t.min()
        text_outliers = lof_outliers(lowered, self.text_lof_neighbours)
        n_text = (n - n_visual) * text_outliers // n
        recovered = torch.argsort(t.masked_fill(self._mask(visual, n), float("-inf")), descending=True,
                                  stable=True)[:n_text]
        how = [f"{n_visual} of {n} tokens LOF outliers of [CLS] attention",
               f"{n_text} recovered by question similarity ({text_outliers} LOF outliers)"]
        if n_visual + n_text > k:
            how.append(f"capped at {k} by keep={self.keep!r}")
        visual = visual[:k]
        recovered = recovered[:k - visual.numel()]
        main = torch.sort(torch.cat([visual, recovered])).values
        # 3. the rest: LOF-counted centres by descending attention, each merged with its neighbours
        rest = (~self._mask(main, n)).nonzero().squeeze(1)
        a_rest = a[rest]
        centre_outliers = lof_outliers(a_rest, self.rest_lof_neighbours)
        room = k - main.numel()
        n_centres = min(centre_outliers, room - 1) if room >= 2 else 0
        how.append(f"{centre_outliers} merge centres among the other {rest.numel()}"
                   + (f", {n_centres} fit keep={self.keep!r}" if n_centres < centre_outliers else ""))
        if n_centres == 0:
            if main.numel() == 0:  # nothing stood out: the code would pass no visual token
                main = torch.argmax(a).reshape(1)
                how.append("no token selected: the highest [CLS] attention kept")
            selection = Selection(slots=index[main])
            selection.note = f"adaptive count: {'; '.join(how)}; {main.numel()} tokens out"
            return selection

        centres = torch.argsort(a_rest, descending=True, stable=True)[:n_centres]
        merged, extra = prumerge_tokens(features[index[rest]], keys[index[rest]], a_rest, centres,
                                        self.merge_neighbours, bias=self.text_weight * t[rest])
        slots = [index[main], index[rest[centres]]]
        if extra is not None:
            others = ~self._mask(centres, rest.numel())
            top = torch.argmax(torch.where(others, a_rest, torch.tensor(float("-inf"), device=device)))
            slots.append(index[rest[top]].reshape(1))
            merged = torch.cat([merged, extra.unsqueeze(0)])
        merged = tokens.project(merged.to(features.dtype)) if pre_projector else merged
        embeds = torch.cat([tokens.embeds[index[main]], merged.to(tokens.embeds.dtype)])
        selection = Selection(slots=torch.cat(slots), embeds=embeds, merged=int(merged.shape[0]))
        selection.note = f"adaptive count: {'; '.join(how)}; {selection.count} tokens out"
        return selection

    @staticmethod
    def _mask(positions: torch.Tensor, n: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=positions.device)
        mask[positions] = True
        return mask
