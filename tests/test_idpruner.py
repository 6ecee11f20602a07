"""IDPruner: the MMR rule against an independent computation, its steps (first pick, parallel_k, lambda), the two
importance sources, newline tokens, and its hyper-parameter checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

import mmprune
import tiny
from mmprune.media import MediaItem, Segment
from mmprune.methods.idpruner import IDPrunerPruner, mmr_select
from mmprune.prompt import PromptText


def mmr_reference(x: np.ndarray, s: np.ndarray, k: int, lam: float, per_step: int = 1) -> list[int]:
    """MMR written out token by token: min-max importance, cosine, the first step by importance alone, then
    lam * imp - (1 - lam) * (largest cosine to any token already kept); ties to the lowest index."""
    imp = (s - s.min()) / (s.max() - s.min() + 1e-6)
    u = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    chosen: list[int] = []
    while len(chosen) < k:
        before = list(chosen)
        scores = []
        for i in range(len(s)):
            if i in before:
                continue
            value = imp[i] if not before else lam * imp[i] - (1 - lam) * max(float(u[i] @ u[j]) for j in before)
            scores.append((-value, i))
        chosen += [i for _, i in sorted(scores)[: min(per_step, k - len(before))]]
    return chosen


@pytest.mark.parametrize("lam, per_step, k", [(0.5, 1, 6), (0.0, 1, 5), (1.0, 1, 4), (0.3, 3, 7), (0.8, 2, 9)])
def test_mmr_matches_the_rule_computed_token_by_token(lam, per_step, k):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 12, generator=g, dtype=torch.float64)
    s = torch.rand(20, generator=g, dtype=torch.float64)
    got = mmr_select(x, s, k, lam, per_step).tolist()
    assert got == mmr_reference(x.numpy(), s.numpy(), k, lam, per_step)


def duplicate_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Token 1 duplicates token 0 (the most important); token 2 is orthogonal and the least important."""
    e = torch.eye(4)
    return torch.stack([e[0], e[0], e[1], 0.6 * e[0] + 0.8 * e[2]]), torch.tensor([1.0, 0.9, 0.0, 0.5])


def test_redundancy_pushes_out_a_duplicate_of_a_kept_token():
    """After token 0, token 1 scores 0.5 * 0.9 - 0.5 * 1 < 0; token 2 scores 0 - 0 = 0; token 3
    0.5 * 0.5 - 0.5 * 0.6 = -0.05: token 2 (the least important) is next, the duplicate last."""
    x, s = duplicate_case()
    assert mmr_select(x, s, 4, 0.5).tolist() == [0, 2, 3, 1]


def test_lambda_one_is_the_importance_order_and_lambda_zero_ignores_importance_after_the_first():
    x, s = duplicate_case()
    assert mmr_select(x, s, 4, 1.0).tolist() == [0, 1, 3, 2]
    # lambda 0: after token 0 the least redundant first (token 2: cosine 0), then token 3 (0.6)
    assert mmr_select(x, s, 3, 0.0).tolist() == [0, 2, 3]


def test_parallel_k_takes_a_steps_top_scores_together():
    """Two per step: the first step is the top two by importance, duplicate included."""
    x, s = duplicate_case()
    assert mmr_select(x, s, 2, 0.5, parallel_k=2).tolist() == [0, 1]
    assert mmr_select(x, s, 3, 0.5, parallel_k=2).tolist() == [0, 1, 2]


def test_ties_go_to_the_lowest_index():
    x = torch.eye(6)
    assert mmr_select(x, torch.ones(6), 3, 0.5).tolist() == [0, 1, 2]


def item(attention: torch.Tensor, embeds: torch.Tensor, segments=None) -> MediaItem:
    return MediaItem(embeds, segments or [Segment(0, 1, embeds.shape[0])], lazy={"token_attention": lambda: attention})


def test_attention_importance_is_the_head_mean_of_token_attention():
    """Head 0 prefers token 5, head 1 token 2; their mean prefers token 2, which is picked first."""
    attention = torch.tensor([[0.0, 0, 0.3, 0, 0, 0.5], [0.1, 0, 0.9, 0, 0, 0.05]])
    embeds = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    selection = mmprune.get("idpruner", keep=3).prune_image(item(attention, embeds))
    expected = mmr_reference(embeds.numpy(), attention.mean(0).numpy(), 3, 0.5)
    assert expected[0] == 2
    assert selection.kept() == sorted(expected) and selection.embeds is None


def test_newline_tokens_are_not_candidates():
    """LLaVA-NeXT layout: two rows of two patches, each followed by a newline (indices 2 and 5). The patches are
    duplicates and the newlines orthogonal to them, so a newline would win every MMR step after the first were it a
    candidate."""
    segments = [Segment(0, 2, 2, newline=True)]
    attention = torch.tensor([[0.1, 0.4, 0.0, 0.3, 0.2, 0.0]])
    e = torch.eye(6)
    embeds = torch.stack([e[0], e[0], e[1], e[0], e[0], e[2]])
    kept = mmprune.get("idpruner", keep=3).prune_image(item(attention, embeds, segments)).kept()
    patches = [0, 1, 3, 4]
    picked = mmr_reference(embeds[patches].numpy(), attention[0, patches].numpy(), 3, 0.5)
    assert kept == sorted(patches[i] for i in picked)
    assert 2 not in kept and 5 not in kept
    # a budget beyond the patches takes newlines to fill it
    assert mmprune.get("idpruner", keep=5).prune_image(item(attention, embeds, segments)).kept() == [0, 1, 2, 3, 4]


def prompt_of(instruction: torch.Tensor) -> PromptText:
    t = instruction.shape[0]
    return PromptText(ids=torch.arange(t), embeds=instruction, positions=torch.arange(t),
                      instruction=torch.ones(t, dtype=torch.bool))


def test_text_importance_is_the_mean_cosine_to_the_instruction_embeddings():
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(10, 8, generator=g)
    instruction = torch.randn(3, 8, generator=g)
    tokens = item(torch.zeros(1, 10), embeds)  # attention would tie everywhere: it must not be read
    tokens.prompt = prompt_of(instruction)
    u = embeds.numpy() / np.linalg.norm(embeds.numpy(), axis=1, keepdims=True)
    w = instruction.numpy() / np.linalg.norm(instruction.numpy(), axis=1, keepdims=True)
    relevance = (u @ w.T).mean(axis=1)
    kept = mmprune.get("idpruner", keep=4, importance="text").prune_image(tokens).kept()
    assert kept == sorted(mmr_reference(embeds.numpy(), relevance, 4, 0.5))
    assert int(np.argmax(relevance)) in kept


def test_only_the_text_importance_reads_the_prompt():
    assert IDPrunerPruner.reads_prompt is False
    assert mmprune.get("idpruner").reads_prompt is False
    assert mmprune.get("idpruner", importance="text").reads_prompt is True


def test_text_importance_without_a_prompt_is_an_error():
    tokens = item(torch.ones(1, 6), torch.eye(6))
    with pytest.raises(RuntimeError, match="idpruner reads the prompt, but this item carries none"):
        mmprune.get("idpruner", keep=2, importance="text").prune_image(tokens)


@pytest.mark.parametrize("params, message", [
    (dict(mmr_lambda=1.5), r"mmr_lambda=1.5 is not valid: expected a number in \[0, 1\]"),
    (dict(mmr_lambda=-0.1), r"mmr_lambda=-0.1 is not valid"),
    (dict(parallel_k=0), r"parallel_k=0 is not valid: expected an int >= 1"),
    (dict(parallel_k=1.5), r"parallel_k=1.5 is not valid"),
    (dict(importance="cls"), r"importance='cls' is not valid: expected one of 'attention', 'text'"),
])
def test_bad_hyper_parameters_fail_at_get(params, message):
    with pytest.raises(ValueError, match=message):
        mmprune.get("idpruner", **params)


def test_text_importance_reads_the_instruction_through_the_engine():
    """Tiny LLaVA, one image between 3 and 4 text tokens: without a tokenizer the instruction is the 4 tokens after
    the image; the kept set is the MMR of the projected tokens by their mean cosine to those tokens' embeddings."""
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[3, ("img", 0), 4]])
    pruner = mmprune.get("idpruner", keep=4, importance="text")
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        embeds = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        instruction = model.get_input_embeddings()(inputs["input_ids"][0, -4:])
    u = embeds.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    w = instruction.double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    assert pruner.stats["reads_prompt"] is True
    assert pruner.stats["samples"][0]["instruction"]["tokens"] == 4
    kept = pruner.stats["samples"][0]["images"][0]["kept"]
    assert kept == sorted(mmr_reference(embeds.double().numpy(), (u @ w.T).mean(axis=1), 4, 0.5))
    assert kept != sorted(mmr_reference(embeds.double().numpy(), -(u @ w.T).mean(axis=1), 4, 0.5))
