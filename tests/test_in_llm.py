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
import torch
from conftest import keep_for, tiny_model

import mmprune
import tiny
from mmprune.engine.layers import StageContext
from mmprune.engine.tokens import Segment, Selection
from mmprune.methods.base import HybridPruner

IN_LLM = [m for m in mmprune.available() if "in-llm" in mmprune.METHODS[m].stage]
ONE_IMAGE = [[3, ("img", 0), 4]]
MIXED = [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), 1], [1, ("img", 3), 9]]
STEPS = 4
IMAGE_ONLY = {"visiondrop"}  # methods whose choices depend on the image alone (not on the text or last token)


@dataclass
class Replay(HybridPruner):
    """Keeps given original token indices before the LLM and at given layers (a test device: re-applies a run's
    kept sets to a longer sequence)."""

    keep: int | float = 1.0
    pre: list[list[int]] = field(default_factory=list)  # [image] kept before the LLM
    layers: list[int] = field(default_factory=list)
    kept: list[list[list[int]]] = field(default_factory=list)  # [stage][image]
    positions: str | None = None

    name: ClassVar[str] = "replay"
    summary: ClassVar[str] = "replay"

    def pre_llm_budget(self, num_tokens):
        return len(self.pre[0]) if self.pre else num_tokens

    def select(self, tokens, k):
        return Selection.of(torch.tensor(self.pre[tokens.sample], device=tokens.embeds.device))

    def plan(self, images, num_layers):
        return self.layers, [[len(stage[image]) for stage in self.kept] for image in range(len(images))]

    def choose(self, ctx, stage, counts):
        out = []
        for image, track in enumerate(ctx.tracks):
            wanted = torch.tensor(self.kept[stage][image], device=track.original.device)
            out.append(Selection.of(torch.isin(track.original, wanted).nonzero().squeeze(1)))
        return out


def replay_of(pruner, stats) -> Replay:
    image = stats["samples"][0]["images"][0]
    return Replay(pre=[image["kept"]], layers=stats["stage_layers"],
                  kept=[[stage["kept"]] for stage in image["stages"]], positions=stats["positions"])


def truncated_plan(plan, stages):
    def first_stages(images, num_layers):
        layers, counts = plan(images, num_layers)
        return layers[:stages], [image_counts[:stages] for image_counts in counts]

    return first_stages


def with_tokens(inputs, tokens):
    full = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = (tokens == tiny.IMAGE_TOKEN).int()
    return full


@pytest.mark.parametrize("method", IN_LLM)
def test_decoding_on_the_pruned_cache_equals_an_uncached_replay(family, method):
    """Tokens and logits of each decode step equal one uncached pass over prompt + generated tokens that removes
    the same tokens at the same layers: positions, masks and the per-layer cache agree."""
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert pruner.stats["stage_layers"], "an in-LLM method must prune at some layer"
    # merging methods cannot be replayed by indices; those whose choice reads only the image are simply rerun
    replay = mmprune.get(method, keep=keep_for(method)) if method in IMAGE_ONLY else replay_of(pruner, pruner.stats)
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
        tracks = [SimpleNamespace(count=image["after"], segments=[Segment(*g) for g in image["segments"]])
                  for image in sample["images"]]
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
    for layer in range(layers):
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
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    sdpa_calls = list(calls)
    if not any(rope for _, _, _, rope, _ in sdpa_calls):
        pytest.skip(f"{method} computes no RoPE attention rows")

    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    stats = pruner.stats
    image = stats["samples"][0]["images"][0]
    for stage, layer, queries, rope, probs in sdpa_calls:
        if not rope:
            continue
        # the sequence the method scored: the earlier stages' kept sets replayed on the eager model
        if method in IMAGE_ONLY:  # merging: rerun the method itself, stopped before this stage
            earlier = copy.deepcopy(pruner)
            earlier.plan = truncated_plan(pruner.plan, stage)
        else:
            earlier = Replay(pre=[image["kept"]], layers=stats["stage_layers"][:stage],
                             kept=[[st["kept"]] for st in image["stages"][:stage]], positions=stats["positions"])
        weights = {}

        def keep_weights(module, args, output):
            weights.setdefault("rows", output[1])  # returns None: the output is unchanged

        hook = eager.model.language_model.layers[layer].self_attn.register_forward_hook(keep_weights)
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
    lm = model.model.language_model
    seen = []
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model):
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
                 for layer in lm.layers]
        try:
            with torch.no_grad():
                model.generate(**tiny.batch(family, MIXED), max_new_tokens=2, do_sample=False)
            implementations = {layer.self_attn.config._attn_implementation for layer in lm.layers}
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
