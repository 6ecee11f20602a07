"""In-LLM pruning on every in-LLM method x every model family (tiny random-weight models built in code).

The generic contract (keep=1.0 identity, detach, padded batches == alone, KV lengths, rules) runs over every
method in test_pre_llm.py; here: decoding on the pruned cache against an uncached replay, the schedule in the KV
cache of every sample, recomputed attention rows against eager attention, and SDPA kept throughout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import pytest
import tiny
import torch
from conftest import decoder, keep_for, pruning, tiny_model

import mmprune
from mmprune import upstream
from mmprune.engine.layers import StageContext
from mmprune.media import Segment, Selection
from mmprune.methods.base import HybridPruner

IN_LLM = [m for m in pruning("image") if "in-llm" in mmprune.METHODS[m].stage]  # that prune images
ONE_IMAGE = [[3, ("img", 0), 4]]
MIXED = [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), 1], [1, ("img", 3), 9]]
STEPS = 4


def with_tokens(inputs, tokens):
    full = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = (tokens == tiny.IMAGE_TOKEN).int()
    return full


@dataclass
class Recorded(HybridPruner):
    """Returns the very selections (slots and embeddings) a method made in an earlier forward: replays merging
    methods exactly (the prompt's hidden states do not depend on tokens appended after it)."""

    keep: int | float = 1.0
    pre: list = field(default_factory=list)  # Selection per image
    layers: list[int] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)
    stages: list = field(default_factory=list)  # [stage] -> list of Selection per image
    positions: str | None = None

    name: ClassVar[str] = "recorded"
    summary: ClassVar[str] = "recorded"

    def prune_image(self, tokens):
        if not self.pre:
            return Selection.identity(tokens.num_tokens)
        # images arrive in the order they were recorded (one forward's images, sample by sample)
        index = getattr(self, "_next", 0)
        self._next = (index + 1) % len(self.pre)
        return self.pre[index]

    def plan(self, images, num_layers):
        return self.layers, self.counts

    def choose(self, ctx, stage, counts):
        return self.stages[stage]


def record(pruner, model, run):
    """Run ``run()`` with ``pruner`` attached, recording its selections; returns a :class:`Recorded` replay."""
    pre, stages, plans = [], [], []
    prune_image = getattr(pruner, "prune_image", None)
    choose, plan = pruner.choose, pruner.plan

    def record_pre(tokens):
        pre.append(prune_image(tokens))
        return pre[-1]

    def record_plan(images, num_layers):
        plans.append(plan(images, num_layers))
        return plans[-1]

    def record_stage(ctx, stage, counts):
        stages.append(choose(ctx, stage, counts))
        return stages[-1]

    if prune_image is not None:
        pruner.prune_image = record_pre
    pruner.plan, pruner.choose = record_plan, record_stage
    with pruner.attach(model), torch.no_grad():
        out = run()
    layers, counts = plans[0]
    return out, Recorded(pre=pre if prune_image is not None else [], layers=layers, counts=counts,
                         stages=stages, positions=pruner.stats["positions"])


@pytest.mark.parametrize("method", IN_LLM)
def test_decoding_on_the_pruned_cache_equals_an_uncached_replay(family, method):
    """Tokens and logits of each decode step equal one uncached pass over prompt + generated tokens that applies
    the same selections at the same layers: positions, masks and the per-layer cache agree."""
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    pruner = mmprune.get(method, keep=keep_for(method))
    out, replay = record(pruner, model, lambda: model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True))
    assert pruner.stats["stage_layers"], "an in-LLM method must prune at some layer"
    with replay.attach(model), torch.no_grad():
        logits = model(**with_tokens(inputs, out.sequences), use_cache=False).logits
    assert final(replay.stats) == final(pruner.stats)
    decoded = torch.stack(out.logits, dim=1)[0]  # (steps, vocab)
    torch.testing.assert_close(logits[0, -STEPS - 1:-1], decoded, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[0, -STEPS - 1:-1].argmax(-1), out.sequences[0, -STEPS:])


def final(stats):
    return [[image["stages"][-1]["kept"] for image in sample["images"]] for sample in stats["samples"]]


@pytest.mark.parametrize("method", IN_LLM)
def test_kv_cache_of_every_sample_follows_the_schedule(family, method):
    model = tiny_model(family)
    inputs = tiny.batch(family, MIXED)
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model), torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    stats = pruner.stats
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != tiny.IMAGE_TOKEN)).sum(1).tolist()
    layers = model.config.text_config.num_hidden_layers
    for sample, image_ids in zip(stats["samples"], ([0], [1, 2], [3])):
        tracks = [SimpleNamespace(count=image["after"], modality="image",
                                  segments=[Segment(*g) for g in image["segments"]]) for image in sample["images"]]
        assert [image["before"] for image in sample["images"]] == [tiny.tokens_per_image(family, i) for i in image_ids]
        stage_layers, schedule = pruner.plan(tracks, layers)
        assert stage_layers == stats["stage_layers"]
        per_layer = [sum(image["after"] for image in sample["images"])] * layers
        for stage, layer in enumerate(stage_layers):
            kept = [len(image["stages"][stage]["kept"]) for image in sample["images"]]
            assert all(k <= counts[stage] for k, counts in zip(kept, schedule))
            if not pruner.variable_counts:
                assert kept == [counts[stage] for counts in schedule]
            for later in range(layer, layers):
                per_layer[later] = sum(kept)
        assert sample["tokens_per_layer"] == per_layer
        assert sample["equivalent_tokens"] == sum(per_layer) / layers
    kinds = upstream.layer_kinds(decoder(model))
    for layer in range(layers):
        if kinds[layer] == "linear_attention":  # a state, not a sequence (tests/test_qwen3_5.py checks the states)
            continue
        expected = max(t + s["tokens_per_layer"][layer] for t, s in zip(text, stats["samples"]))
        assert cache.get_seq_length(layer) == expected


@pytest.mark.parametrize("method", IN_LLM)
def test_recomputed_attention_rows_equal_eager_attention(family, method, monkeypatch):
    """Every attention row a method computes itself equals that row of the eager attention weights of the same
    layer on the same (already reduced) sequence."""
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    calls = []
    original = StageContext.attention

    def spy(ctx, layer, queries, rope=True):
        probs = original(ctx, layer, queries, rope)
        calls.append((ctx.stage, layer, queries.clone(), rope, probs))
        return probs

    monkeypatch.setattr(StageContext, "attention", spy)
    pruner = mmprune.get(method, keep=keep_for(method))
    _, recorded = record(pruner, model, lambda: model(**inputs))
    sdpa_calls = list(calls)
    if not any(rope for _, _, _, rope, _ in sdpa_calls):
        pytest.skip(f"{method} computes no RoPE attention rows")

    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    for stage, layer, queries, rope, probs in sdpa_calls:
        if not rope:
            continue
        # the sequence the method scored: the earlier stages' selections replayed on the eager model
        earlier = copy.copy(recorded)
        earlier.layers, earlier.counts = recorded.layers[:stage], [c[:stage] for c in recorded.counts]
        weights = {}

        def keep_weights(module, args, output):
            weights.setdefault("rows", output[1])  # returns None: the output is unchanged

        hook = decoder(eager).layers[layer].self_attn.register_forward_hook(keep_weights)
        try:
            with earlier.attach(eager), torch.no_grad():
                eager(**inputs)
        finally:
            hook.remove()
        rows = weights["rows"][0][:, queries[0]]  # (heads, q, L)
        torch.testing.assert_close(probs[0], rows.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", IN_LLM)
def test_attention_implementation_unchanged_while_attached(family, method):
    model = tiny_model(family)
    lm = decoder(model)
    seen = []
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model):
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
                 for layer in lm.layers]
        try:
            with torch.no_grad():
                model.generate(**tiny.batch(family, MIXED), max_new_tokens=2, do_sample=False)
            implementations = {layer.self_attn.config._attn_implementation for layer in lm.layers
                               if hasattr(layer, "self_attn")}  # Qwen3.5's linear layers have none
        finally:
            for hook in hooks:
                hook.remove()
    assert implementations == {"sdpa"} and lm.config._attn_implementation == "sdpa"
    assert seen and not any(kwargs.get("output_attentions") for kwargs in seen)


# ---------------------------------------------------------------------------------------------------- debiasing
def test_debias_removes_a_positional_trend_and_sinks():
    from mmprune.methods.debias import debias_scores

    positions = torch.arange(40)
    content = torch.ones(40)
    content[[3, 11, 19, 27]] = 4.0  # what the image really holds
    trend = torch.exp(positions / 8.0)  # recency: later tokens (nearer the query) score higher for no reason
    raw = content * trend
    raw[35] = 1e4  # an attention sink
    assert set(torch.topk(raw, 4).indices.tolist()) != {3, 11, 19, 27}
    assert set(torch.topk(debias_scores(raw, positions), 4).indices.tolist()) == {3, 11, 19, 27}


ATTENTION_SCORED = [m for m in IN_LLM if mmprune.METHODS[m].attention_scored]


@pytest.mark.parametrize("method", ATTENTION_SCORED)
def test_debias_wraps_every_attention_scored_method(method):
    model = tiny_model("llava")
    inputs = tiny.batch("llava", MIXED)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        with mmprune.get(method, keep=1.0, debias=True).attach(model):
            assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), reference)
        pruner = mmprune.get(method, keep=keep_for(method), debias=True)
        with pruner.attach(model):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.debias and all(sample["equivalent_tokens"] < sample["visual_tokens_before"]
                                 for sample in pruner.stats["samples"])


def test_debias_is_refused_where_scores_are_not_attention():
    for method in IN_LLM:
        if not mmprune.METHODS[method].attention_scored:
            with pytest.raises(ValueError, match="does not score tokens by attention"):
                mmprune.get(method, debias=True)


def test_todre_adaptive_drops_an_image_once_the_last_token_stops_reading_it():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    for threshold, expected in ((0.999, [4, 4, 0, 0]), (1e-9, [4, 4, 4, 4])):
        pruner = mmprune.get("todre", keep=4, adaptive=True, drop_layer=2, migration_threshold=threshold)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        assert pruner.stats["stage_layers"] == [2, 3]
        assert pruner.stats["samples"][0]["tokens_per_layer"] == expected


def test_sparsevlm_recycles_pruned_tokens_as_cluster_means():
    from mmprune.methods.sparsevlm import dpc_knn, recycled

    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    seen = []
    original = StageContext.__init__

    def spy(ctx, runner, layer, hidden, stage):
        original(ctx, runner, layer, hidden, stage)
        seen.append(hidden.clone())

    pruner = mmprune.get("sparsevlm", keep=0.5)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(StageContext, "__init__", spy)
        with pruner.attach(model):
            model(**inputs)
    image = pruner.stats["samples"][0]["images"][0]
    kept = pruner._kept[0][0]
    pruned = 16 - kept
    count, clusters = recycled(pruned)
    assert len(image["stages"][0]["kept"]) == kept + clusters
    assert pruner.stats["samples"][0]["tokens_per_layer"][1] == kept + clusters
    # the merged tokens are plain means of DPC-kNN clusters of the recycled tokens' hidden states
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    assign = dpc_knn(x, 3)
    assert sorted(assign.unique().tolist()) == [0, 1, 2]
    assert count == int(0.3 * pruned) + 1 and clusters == int(count / 10) + 1


def test_sparsevlm_density_counts_the_token_itself_among_its_k_nearest():
    """Points 0, 1, 3, 7 on a line (C = 1), k = 2: each row's two smallest distances include its own 0, so
    rho = exp(-[(0+1)/2, (0+1)/2, (0+4)/2, (0+16)/2]); the densest point, then the next by rho * delta, centre."""
    from mmprune.methods.sparsevlm import dpc_knn, knn_density

    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    d = torch.cdist(x, x)
    torch.testing.assert_close(knn_density(d, 2), torch.exp(-torch.tensor([0.5, 0.5, 2.0, 8.0])))
    torch.testing.assert_close(knn_density(d, 1), torch.ones(4))
    # rho * delta: the denser of points 0 and 1 (the noise decides) has delta = 7, the largest distance; the other
    # exp(-0.5) * 1 = 0.61; point 3: exp(-2) * 2 = 0.27; point 7: exp(-8) * 4 = 0.001. Centres: points 0 and 1;
    # points 3 and 7 join the nearer one, 1
    assign = dpc_knn(x, 2)
    assert assign[0] != assign[1] and assign[2] == assign[1] and assign[3] == assign[1]
