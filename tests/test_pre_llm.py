"""Pre-LLM pruning on every method x every model family (tiny random-weight models built in code)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import (adaptive_count, decoder, duplicate_rounds, keep_for, pruning, qwen_vision_attention_received,
                      tiny_model)

import mmprune
import tiny
from mmprune.engine.session import final_kept

METHODS = pruning("image")  # methods that prune images (none: its own test; EVS prunes videos only)
PRE_LLM = [m for m in METHODS if mmprune.METHODS[m].stage == "pre-llm"]
HYBRID = [m for m in METHODS if mmprune.METHODS[m].stage == "pre+in-llm"]
GEN = dict(max_new_tokens=4, do_sample=False)
ONE_IMAGE = [[3, ("img", 0), 4]]
# mixed lengths, a sample with two images (so samples drop different numbers of tokens and need re-padding)
MIXED = [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), 1], [1, ("img", 3), 9]]


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, **GEN)


def generate_with_logits(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens ``(batch, n)`` and the prompt's last-position logits ``(batch, vocab)`` (generate's first
    step, before any logits processor), from one generate() call."""
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -GEN["max_new_tokens"]:], out.logits[0]


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


kept_sets = final_kept


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_equals_unpatched_model(family, method):
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    ref_tokens, ref_logits = generate_with_logits(model, inputs)
    pruner = mmprune.get(method, keep=1.0)
    with pruner.attach(model):
        tokens, logits = generate_with_logits(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    image = pruner.stats["samples"][0]["images"][0]
    assert image["after"] == image["before"] == tiny.tokens_per_image(family, 0)
    assert image["kept"] == list(range(image["before"]))


@pytest.mark.parametrize("method", METHODS)
def test_detach_restores_model_exactly(family, method):
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    before = last_logits(model, inputs)
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model):
        pruned = last_logits(model, inputs)
    assert not torch.equal(pruned, before), "pruning a quarter of the tokens should change the logits"
    assert torch.equal(last_logits(model, inputs), before)
    with pytest.raises(RuntimeError, match="boom"):
        with pruner.attach(model):
            last_logits(model, inputs)
            raise RuntimeError("boom")
    assert torch.equal(last_logits(model, inputs), before)
    assert "get_image_features" not in model.model.__dict__
    assert not decoder(model)._forward_pre_hooks
    assert not model.model._forward_pre_hooks


@pytest.mark.parametrize("method", METHODS)
def test_padded_batches_match_each_sample_alone(family, method):
    """Each sample of a mixed batch keeps the tokens it keeps alone, and gets the same greedy tokens when the batch
    is left-padded (generate) and the same last-token logits when it is right-padded (one forward)."""
    model = tiny_model(family)
    n = GEN["max_new_tokens"]
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model), torch.no_grad():
        alone_tokens, alone_logits, alone_kept = [], [], []
        for sample in MIXED:
            tokens, logits = generate_with_logits(model, tiny.batch(family, [sample]))
            alone_tokens.append(tokens[0])
            alone_logits.append(logits[0])
            alone_kept.append(kept_sets(pruner.stats)[0])
        left = generate(model, tiny.batch(family, MIXED, side="left"))
        assert kept_sets(pruner.stats) == alone_kept
        assert pruner.stats["samples"][0]["tokens_per_layer"][0] > 0
        for i in range(len(MIXED)):
            assert torch.equal(left[i, -n:], alone_tokens[i])

        inputs = tiny.batch(family, MIXED, side="right")
        last = inputs["attention_mask"].sum(1) - 1
        out = model(**inputs).logits
        assert kept_sets(pruner.stats) == alone_kept
        after = [s["tokens_per_layer"][-1] - s["visual_tokens_before"] for s in pruner.stats["samples"]]
        for i in range(len(MIXED)):
            # right padding keeps each sample's tokens at the front: its last real token moved by what it dropped
            torch.testing.assert_close(out[i, last[i] + after[i]], alone_logits[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_holds_text_plus_kept_tokens_in_every_layer(family, method):
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    text = int((inputs["input_ids"] != tiny.IMAGE_TOKEN).sum())
    pruner = mmprune.get(method, keep=keep_for(method))
    with pruner.attach(model), torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    per_layer = pruner.stats["samples"][0]["tokens_per_layer"]
    layers = model.config.text_config.num_hidden_layers
    # linear-attention layers (Qwen3.5) keep a state, not a sequence: their states are checked in the family's tests
    kinds = getattr(model.config.text_config, "layer_types", None) or ["full_attention"] * layers
    counted = [layer for layer in range(layers) if kinds[layer] != "linear_attention"]
    assert [cache.get_seq_length(layer) for layer in counted] == [text + per_layer[layer] for layer in counted]
    n = tiny.tokens_per_image(family, 0)
    if method in PRE_LLM:
        kept = pruner.stats["samples"][0]["visual_tokens_after"]
        budget = mmprune.resolve_keep(0.25, n)
        assert kept == budget or method == "pool" or (adaptive_count(method) and 1 <= kept <= budget)
        assert per_layer == [kept] * layers
    else:
        stages = pruner.stats["stage_layers"]
        entering = pruner.stats["samples"][0]["visual_tokens_llm_input"]
        assert per_layer[stages[-1]] < entering and per_layer[0] == entering
        assert entering == (n if method not in HYBRID else mmprune.METHODS[method].pre_llm_budget(pruner, n))


@pytest.mark.parametrize("method", PRE_LLM)
def test_cached_decoding_agrees_with_full_recomputation(family, method, monkeypatch):
    """Greedy tokens decoded on the pruned KV cache equal the argmax of one uncached pass over the pruned prompt
    plus those tokens: positions, masks and cache agree. A method that reads the prompt would read the generated
    tokens as part of the replay's question, so the replay is given the selections of the first pass."""
    model = tiny_model(family)
    inputs = tiny.batch(family, ONE_IMAGE)
    n = GEN["max_new_tokens"]
    pruner = mmprune.get(method, keep=keep_for(method))
    chosen = []
    if pruner.reads_prompt:
        prune = type(pruner).prune_image
        monkeypatch.setattr(type(pruner), "prune_image", lambda self, tokens: (
            chosen.pop(0) if getattr(self, "replaying", False) else chosen.append(prune(self, tokens)) or chosen[-1]))
    with pruner.attach(model), torch.no_grad():
        tokens = model.generate(**inputs, **GEN)
        pruner.replaying = True
        full = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens))
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = (tokens == tiny.IMAGE_TOKEN).int()
        logits = model(**full, use_cache=False).logits
    assert torch.equal(logits[0, -n - 1:-1].argmax(-1), tokens[0, -n:])


def test_llm_keeps_its_attention_implementation(family):
    model = tiny_model(family)
    seen = []
    lm = decoder(model)
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model):
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
        try:
            generate(model, tiny.batch(family, ONE_IMAGE))
        finally:
            handle.remove()
        assert lm.config._attn_implementation == "sdpa"
    assert seen and not any(kwargs.get("output_attentions") for kwargs in seen)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_kept_tokens_keep_original_positions(family_name):
    model = tiny_model(family_name)
    inputs = tiny.batch(family_name, [[3, ("img", 1), 4]])
    lm = model.model.language_model
    with torch.no_grad():
        original, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      image_grid_thw=inputs["image_grid_thw"])
    seen = []
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model):
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
        try:
            generate(model, inputs)
        finally:
            handle.remove()
    kept = pruner.stats["samples"][0]["images"][0]["kept"]
    image_positions = (inputs["input_ids"][0] == tiny.IMAGE_TOKEN).nonzero().squeeze(1)
    text = (inputs["input_ids"][0] != tiny.IMAGE_TOKEN).nonzero().squeeze(1)
    keep_idx = torch.sort(torch.cat([text, image_positions[kept]])).values
    prefill = seen[0][-3:]  # the (t, h, w) rows
    assert torch.equal(prefill[:, 0], original[:, 0, keep_idx])
    # decode step j continues at the original next position: max + 1 + j (rope_deltas of the unpruned prompt)
    next_position = int(original.max()) + 1
    for j, positions in enumerate(seen[1:]):
        assert positions[-3:].reshape(3, -1).tolist() == [[next_position + j]] * 3
    assert int(deltas[0]) == next_position - inputs["input_ids"].shape[1]


def test_stats_are_json_and_describe_the_forward(family):
    model = tiny_model(family)
    pruner = mmprune.get("random", keep=0.25, seed=3)
    with pruner.attach(model):
        generate(model, tiny.batch(family, MIXED))
    stats = json.loads(json.dumps(pruner.stats))
    assert len(stats["samples"]) == len(MIXED)
    assert [len(s["images"]) for s in stats["samples"]] == [1, 2, 1]
    for sample in stats["samples"]:
        assert len(sample["tokens_per_layer"]) == model.config.text_config.num_hidden_layers
        for image in sample["images"]:
            assert image["after"] == len(image["kept"]) and image["after"] < image["before"]
            assert image["kept"] == sorted(image["kept"])
    assert stats["selection_ms"] >= 0.0
    assert stats["positions"] == ("original" if family.startswith("qwen") else "renumber")


# ---------------------------------------------------------------------------------------------------- the rules
def _eager_llava_vision(model, pixel_values):
    """Attentions and hidden states of the CLIP tower, computed with eager attention on a copy of the weights."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        return eager.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)


def _eager_llm_attentions(model, inputs):
    """Decoder attention probabilities of the unpruned prompt, eager attention on a copy of the weights."""
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        return eager(**inputs, output_attentions=True).attentions


def _visual_columns(inputs):
    return (inputs["input_ids"][0] == tiny.IMAGE_TOKEN).nonzero().squeeze(1)


def _features(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]


def rule_random(model, inputs, k):
    g = torch.Generator().manual_seed(0 * 1_000_003 + 0)
    return sorted(torch.randperm(16, generator=g)[:k].tolist())


def rule_uniform(model, inputs, k):
    assert k == 4  # 4x4 grid, stride 2
    return [0, 2, 8, 10]


def rule_pool(model, inputs, k):
    assert k == 4  # 2x2 windows of the 4x4 grid; each pooled token takes its window's centre (top-left) slot
    return [0, 2, 8, 10]


def rule_fastervlm(model, inputs, k):
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2]
    return sorted(attn[0, :, 0, 1:].mean(0).topk(k).indices.tolist())


def rule_visionzip(model, inputs, k, contextual=None):
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2]
    contextual = round(k * 10 / 64) if contextual is None else contextual
    dominant = attn[0, :, 0, 1:].sum(0).topk(k - contextual - 1).indices.tolist()
    rest = [i for i in range(16) if i not in dominant]
    step = max(1, len(rest) // contextual)
    targets = [rest[j] for j in range(0, len(rest), step)][:contextual]
    return sorted(set(dominant) | set(targets))


def rule_visiondrop(model, inputs, k):
    """The pre-LLM stage: VisionZip with the reference's 42:6 dominant:contextual split at the scaled count."""
    contextual = round(k * 6 / 48)
    return rule_visionzip(model, inputs, k, contextual)


def rule_fastv(model, inputs, k, layer):
    row = _eager_llm_attentions(model, inputs)[layer - 1][0, :, -1]  # layer K-1, last prompt token, per head
    return sorted(row.mean(0)[_visual_columns(inputs)].topk(k).indices.tolist())


def rule_pyramiddrop(model, inputs, k, layer):
    row = _eager_llm_attentions(model, inputs)[layer][0, :, -1]  # the next layer K's row on its input
    return sorted(row.mean(0)[_visual_columns(inputs)].topk(k).indices.tolist())


def rule_sparsevlm(model, inputs, k, layer):
    """Raters: text tokens after the image whose mean softmax-over-text of V T^T (LLM input) is above the mean;
    score: their head-mean attention at layer K-1 (the unpruned prompt), averaged over raters."""
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
    visual = _visual_columns(inputs)
    text = torch.arange(int(visual[-1]) + 1, embeds.shape[0])
    m = (embeds[visual] @ embeds[text].T).softmax(-1).mean(0)
    raters = text[m > m.mean()]
    attn = _eager_llm_attentions(model, inputs)[layer - 1][0]  # (heads, L, L)
    scores = attn[:, raters][:, :, visual].mean(0).mean(0)
    return sorted(scores.topk(k).indices.tolist())


def rule_feather(model, inputs, k, layer):
    """Top-k of the last token's RoPE-free query against the image keys (softmax over them) at layer K-1, united
    with the stride-3 grid (of a 4x4 grid: 0, 3, 12, 15)."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer - 1][0]  # input of layer K-1
        block = model.model.language_model.layers[layer - 1]
        x = block.input_layernorm(hidden)
        heads, head_dim = model.config.text_config.num_attention_heads, block.self_attn.head_dim
        q = block.self_attn.q_proj(x[-1]).view(heads, head_dim)
        keys = block.self_attn.k_proj(x[_visual_columns(inputs)]).view(16, -1, head_dim)
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1).transpose(0, 1)  # (heads, 16, d)
        scores = ((keys @ q.unsqueeze(-1)).squeeze(-1) * head_dim**-0.5).softmax(-1).mean(0)
    return sorted(set(scores.topk(k).indices.tolist()) | {0, 3, 12, 15})


def rule_dart(model, inputs, k, layer):
    """Pivots by L1 norm of post-RoPE keys at layer K-1 (HF's own rotary code), then per pivot the least
    cosine-similar remaining visual tokens of model.norm(input of layer K)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        block = lm.layers[layer - 1]
        x = block.input_layernorm(hidden[layer - 1])
        length = x.shape[1]
        keys = block.self_attn.k_proj(x).view(1, length, -1, block.self_attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, torch.arange(length).unsqueeze(0))
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        norms = keys[0].abs().sum(dim=(0, 2)).numpy()
        features = torch.nn.functional.normalize(lm.norm(hidden[layer][0]), dim=-1).numpy()
    visual = _visual_columns(inputs).numpy()
    text = np.arange(int(visual[-1]) + 1, length)
    vp = list(np.argsort(-norms[visual], kind="stable")[:4])
    tp = list(text[np.argsort(-norms[text], kind="stable")[:4]])
    pivots = [features[visual[i]] for i in vp] + [features[t] for t in tp]
    chosen, candidates, left = list(vp), [i for i in range(len(visual)) if i not in vp], k - len(vp)
    for p, pivot in enumerate(pivots):
        share = left // len(pivots) + int(p < left % len(pivots))
        order = sorted(candidates, key=lambda i: features[visual[i]] @ pivot)[:share]
        chosen += order
        candidates = [i for i in candidates if i not in order]
    return sorted(int(i) for i in chosen)


def rule_todre(model, inputs, k):
    """Greedy k-center under cosine distance, first centre farthest from the mean token."""
    x = _features(model, inputs).double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(0) / np.linalg.norm(x.mean(0))
    chosen = [int(np.argmax(1 - x @ mean))]
    while len(chosen) < k:
        nearest = (1 - x @ x[chosen].T).min(axis=1)
        nearest[chosen] = -np.inf
        chosen.append(int(np.argmax(nearest)))
    return sorted(chosen)


def rule_divprune(model, inputs, k):
    x = _features(model, inputs).double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1 - x @ x.T
    np.fill_diagonal(d, np.inf)
    chosen = [int(np.argmax(d.min(axis=1)))]
    np.fill_diagonal(d, 0)
    while len(chosen) < k:
        nearest = d[:, chosen].min(axis=1)
        nearest[chosen] = -np.inf
        chosen.append(int(np.argmax(nearest)))
    return sorted(chosen)


def _lof_count(values, neighbours):
    """scikit-learn's LocalOutlierFactor(contamination="auto") outlier count on scalars, written out: k = min(
    neighbours, n - 1) nearest others (ties to the lower index), reachability max(d, k-distance of the neighbour),
    lrd = 1 / (mean + 1e-10), outlier when mean lrd of the neighbours / own lrd > 1.5."""
    v, n = [float(x) for x in values], len(values)
    if n < 2:
        return 0
    k = min(neighbours, n - 1)
    near = [sorted((j for j in range(n) if j != i), key=lambda j: (abs(v[i] - v[j]), j))[:k] for i in range(n)]
    kdist = [abs(v[i] - v[near[i][-1]]) for i in range(n)]
    lrd = [1 / (np.mean([max(abs(v[i] - v[j]), kdist[j]) for j in near[i]]) + 1e-10) for i in range(n)]
    return sum(np.mean([lrd[j] for j in near[i]]) / lrd[i] > 1.5 for i in range(n))


def rule_recoverable(model, inputs, k):
    """Recoverable Compression with numpy on 16 patches: a = PruMerge's last-layer single-head [CLS] attention;
    t = cosine of each projected token to the mean of the normalised input embeddings of the 4 text tokens after
    the image (no tokenizer: the instruction). LOF(a, v) outliers by descending a; then floor((16 - n_v) *
    LOF(t lowered to min t at those, t) / 16) more by descending t; the budget of 4 in that order; the rest's
    LOF(a, 10) outliers (as many as fit, one place left) are centres; the extra token takes the slot of the rest's
    non-centre of highest a. RULE_PARAMS takes v = 3, t = 2 (the defaults 20, 20 find no outlier among 16 tiny
    tokens): 3 visual outliers, 1 of 3 recovered tokens within the budget, no room for a centre."""
    a = _prumerge_cls_attention(model, inputs)
    params = RULE_PARAMS["recoverable"]
    x = _features(model, inputs).double().numpy()
    with torch.no_grad():
        q = model.get_input_embeddings()(inputs["input_ids"][0, -4:]).double().numpy()
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).mean(axis=0)
    t = x @ q / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    visual = [int(i) for i in np.argsort(-a, kind="stable")[:_lof_count(a, params["visual_lof_neighbours"])]]
    lowered = np.where(np.isin(np.arange(16), visual), t.min(), t)
    n_text = (16 - len(visual)) * _lof_count(lowered, params["text_lof_neighbours"]) // 16
    recovered = [int(i) for i in np.argsort(-t, kind="stable") if i not in visual][:n_text]
    main = visual[:k] + recovered[:k - len(visual[:k])]
    rest = [i for i in range(16) if i not in main]
    room = k - len(main)
    centres = sorted(rest, key=lambda i: -a[i])[:min(_lof_count(a[rest], 10), room - 1) if room >= 2 else 0]
    others = [i for i in rest if i not in centres]
    kept = main + centres + ([max(others, key=lambda i: a[i])] if centres and others else [])
    return sorted(kept or [int(np.argmax(a))])


def rule_zeroth_order(model, inputs, k):
    """ZOO-Prune with numpy and the model's projector: 64 unit directions (randn from a CPU generator seeded 0,
    normalised), S_i = mean_j ||P(x_i + 0.01 u_j) - P(x_i - 0.01 u_j)|| / 0.02 on the feature layer's patches;
    s = min-max of S; first argmax s, then argmax s_i (1 - max cos to the kept projected tokens)."""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    features = out.hidden_states[-2][0, 1:]
    u = torch.randn(64, features.shape[-1], generator=torch.Generator().manual_seed(0))
    u = u / u.norm(dim=1, keepdim=True)
    project = model.model.multi_modal_projector
    with torch.no_grad():
        s = np.array([np.mean([float(((project(f + 0.01 * d) - project(f - 0.01 * d)) / 0.02).norm()) for d in u])
                      for f in features])
    s = (s - s.min()) / (s.max() - s.min())
    x = _features(model, inputs).double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    chosen = [int(np.argmax(s))]
    while len(chosen) < k:
        score = s * (1 - (x @ x[chosen].T).max(axis=1))
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rule_mmtok(model, inputs, k):
    """MMTok with numpy: the 4 text tokens after the image are the instruction (no tokenizer); P = softmax over the
    16 projected tokens of cos(instruction, tokens) / 0.02, / 4; Q = softmax over columns of cos(hidden_states[-2]
    patches) / 0.2, / 16; greedy on [P; 0.5 Q], each step's gain f(S + j) - f(S) of f(S) = sum_r max_{s in S} C[r, s]
    evaluated explicitly, ties to the lower index."""
    with torch.no_grad():
        text = model.get_input_embeddings()(inputs["input_ids"][0, -4:]).double().numpy()
    v = _features(model, inputs).double().numpy()
    h = _eager_llava_vision(model, inputs["pixel_values"]).hidden_states[-2][0, 1:].double().numpy()
    cover = np.vstack([_softmax(_unit(text) @ _unit(v).T / 0.02, 1) / 4,
                       0.5 * _softmax(_unit(h) @ _unit(h).T / 0.2, 1) / 16])

    def f(chosen):
        return cover[:, chosen].max(axis=1).sum() if chosen else 0.0

    chosen = []
    while len(chosen) < k:
        gains = [(f(chosen + [j]) - f(chosen), -j) for j in range(16) if j not in chosen]
        chosen.append(-max(gains)[1])
    return sorted(chosen)


def rule_flashvlm(model, inputs, k):
    """FlashVLM with numpy: relevance of the 16 projected tokens to all 7 text tokens of the prompt (soft max over
    them at 0.05, softmax over the image at 0.01, power 2.5, min-max, x0.1 below the 0.995 quantile, min-max); fused
    with the min-max eager head-mean [CLS] attention (layer -2) as sqrt(A R), both clamped at 1e-6; top int(k / 2) by
    it, then VisPruner's rounds over the rest (descending score) on hidden_states[-2]."""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    a = out.attentions[-2][0, :, 0, 1:].mean(0).double().numpy()
    h = _unit(out.hidden_states[-2][0, 1:].double().numpy())
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        text = model.get_input_embeddings()(ids[ids != tiny.IMAGE_TOKEN]).double().numpy()
    s = _unit(_features(model, inputs).double().numpy()) @ _unit(text).T
    pooled = (_softmax(s / 0.05, 1) * s).sum(1)
    r = _softmax(pooled / 0.01, 0) ** 2.5
    r = (r - r.min()) / (r.max() - r.min() + 1e-6)
    r = np.where(r >= np.quantile(r, 0.995), r, 0.1 * r)
    r = (r - r.min()) / (r.max() - r.min() + 1e-6)
    saliency = (a - a.min()) / (a.max() - a.min() + 1e-6)
    score = np.sqrt(np.maximum(saliency, 1e-6) * np.maximum(r, 1e-6))
    order = [int(i) for i in np.argsort(-score, kind="stable")]
    diverse = k - k // 2
    important, rest = order[: k // 2], order[k // 2:]
    rest = duplicate_rounds(rest, h, diverse)
    return sorted(important + rest)


RULE_PARAMS = {
    "sparsevlm": {"recycle": False},  # recycling has its own test (test_in_llm.py)
    "hiprune": {"alpha": 1.0},  # round(4 * 1.0 / 5) = 1 anchor (the default 0.1 gives none)
    "recoverable": {"visual_lof_neighbours": 3, "text_lof_neighbours": 2},  # outliers among 16 tiny tokens
}


def rule_cluster(model, inputs, k):
    """k-means written out with numpy: evenly spaced starts, squared Euclidean distance on normalised tokens, at most
    20 rounds; each non-empty cluster keeps the slot of its first member."""
    x = _features(model, inputs).double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    centres = x[np.round(np.linspace(0, len(x) - 1, k)).astype(int)].copy()
    assign = None
    for _ in range(20):
        new = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for c in range(k):  # an empty cluster takes the point farthest from its centre (clusters of 2+ points)
            if (new == c).any():
                continue
            counts = np.bincount(new, minlength=k)
            far = ((x - centres[new]) ** 2).sum(-1)
            far[counts[new] <= 1] = -1
            if far.max() > 0:
                new[int(far.argmax())] = c
                centres[c] = x[int(far.argmax())]
        if assign is not None and (new == assign).all():
            break
        assign = new
        for c in range(k):
            if (assign == c).any():
                centres[c] = x[assign == c].mean(0)
    return sorted(int(np.nonzero(assign == c)[0][0]) for c in range(k) if (assign == c).any())


def rule_vtc_cls(model, inputs, k):
    """The tiny CLIP has 3 layers: the scaled start (16 of 24 -> 2) is capped at L - 2 = 1, so attentions[1:-1]:
    layer 1's eager [CLS] row, head-mean."""
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions
    scores = sum(a[0, :, 0, 1:].mean(0) for a in attn[1:-1])
    return sorted(scores.topk(k).indices.tolist())


def rule_tome(model, inputs, k):
    """16 -> 4: the first step merges all 8 A tokens (r = 8) into B (slots 1, 3, ..., 15); the second merges the
    new A half (slots 1, 5, 9, 13) into the B half, whatever the similarities."""
    assert k == 4
    return [3, 7, 11, 15]


def rule_holov(model, inputs, k):
    """HoloV with numpy: 16 * 16 // (9 * 4) = 7 contiguous chunks [3, 3, 2, 2, 2, 2, 2]; chunk score = mean of
    1000 a + 0.09 * scale * var (cosine of projected tokens, diagonal zeroed); floor(w k) + leftovers to the largest
    weights; each chunk's top by eager head-mean [CLS] attention (layer -2)."""
    a = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2][0, :, 0, 1:].mean(0).double().numpy()
    x = _features(model, inputs).double().numpy()
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)
    chunks = 16 * 16 // (9 * k)
    sizes = [16 // chunks + int(c < 16 % chunks) for c in range(chunks)]
    bounds = np.cumsum([0] + sizes)
    scores = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        sim = x[s:e] @ x[s:e].T
        np.fill_diagonal(sim, 0.0)
        mean = sim.sum(1) / (e - s - 1)
        var = ((sim - mean[:, None]) ** 2).sum(1) / (e - s - 1)
        att = 1000 * a[s:e]
        scores.append((att + 0.09 * var * np.abs(att).mean() / (np.abs(var).mean() + 1e-6)).mean())
    w = np.array(scores) / (sum(scores) + 1e-6)
    alloc = np.floor(w * k).astype(int)
    for c in sorted(range(chunks), key=lambda c: -w[c])[: k - alloc.sum()]:
        alloc[c] += 1
    assert (alloc <= np.array(sizes)).all()  # no overflow at this budget (tests/test_holov.py covers it)
    return sorted(int(s + i) for s, e, n in zip(bounds[:-1], bounds[1:], alloc)
                  for i in np.argsort(-a[s:e], kind="stable")[:n])


def rule_vispruner(model, inputs, k):
    """VisPruner with numpy: top int(k / 2) by eager head-mean [CLS] attention (layer -2); the rest in descending
    attention, rounds drop min(8, R - T_div, |even|) even-position candidates with the largest best cosine (of
    hidden_states[-2]) to an odd-position one, the list becoming [other evens by descending score, odds]."""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    a = out.attentions[-2][0, :, 0, 1:].mean(0).double().numpy()
    h = out.hidden_states[-2][0, 1:].double().numpy()
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    order = [int(i) for i in np.argsort(-a, kind="stable")]
    diverse = k - k // 2
    important, rest = order[: k // 2], order[k // 2:]
    rest = duplicate_rounds(rest, h, diverse)
    return sorted(important + rest)


def rule_pitome(model, inputs, k):
    """PiToMe with numpy, defaults (ratio 0.9, margin 0.5, alpha 1, plain mean): 16 -> 4 in twelve steps of
    r = max(1, floor(n - 0.9 n)) = 1; energy mean_j ELU(cos_ij - 0.5); the 2r most energetic alternate into A/B by
    rank, each A joins its most similar B; protected tokens then B tokens go on."""
    x = _features(model, inputs).double().numpy()
    slots = list(range(len(x)))
    while len(x) > k:
        n = len(x)
        r = min(max(1, int(np.floor(n - n * 0.9))), n // 2, n - k)
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = u @ u.T
        d = sim - 0.5
        rank = np.argsort(-np.where(d > 0, d, np.expm1(d)).mean(1), kind="stable")
        a, b, protected = rank[:2 * r:2], rank[1:2 * r:2], rank[2 * r:]
        groups = {int(j): [int(j)] for j in b}
        for i in a:
            groups[int(b[np.argmax(sim[i, b])])].append(int(i))
        x = np.stack([x[i] for i in protected] + [x[groups[int(j)]].mean(0) for j in b])
        slots = [slots[i] for i in protected] + [slots[j] for j in b]
    return sorted(slots)


def rule_sms(model, inputs, k):
    """The adaptive count, computed here (k is the method's own count, only checked): cosine of each patch's
    hidden state to [CLS]'s at the feature layer (hidden_states[-2]), sorted descending; the knee is the point of
    largest signed distance below the line through the first and last points; the tokens before it, at most the
    test's budget of 4."""
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
    h = hidden[0].double().numpy()
    cos = h[1:] @ h[0] / (np.linalg.norm(h[1:], axis=1) * np.linalg.norm(h[0]))
    order = np.argsort(-cos, kind="stable")
    y, n = cos[order], len(cos)
    dx, dy = n - 1, y[-1] - y[0]
    below = -(dx * (y - y[0]) - dy * np.arange(n)) / np.hypot(dx, dy)
    knee = int(np.argmax(below))
    count = min(knee if below[knee] > 0 else n, 4)
    assert count == k
    return sorted(order[:count].tolist())


def _prumerge_cls_attention(model, inputs):
    """PruMerge's code: q_proj / k_proj outputs of the last CLIP layer (full width, one head) on its input
    (layer_norm1 of hidden_states[-2] of the eager tower), softmax(q_cls k^T / sqrt(width)), [CLS] column dropped."""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    tower = model.model.vision_tower
    last = getattr(tower, "vision_model", tower).encoder.layers[-1]
    with torch.no_grad():
        x = last.layer_norm1(out.hidden_states[-2])
        q, key = last.self_attn.q_proj(x), last.self_attn.k_proj(x)
        return ((q @ key.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)[0, 0, 1:].double().numpy()


def rule_prumerge(model, inputs, k, plus=False):
    """The adaptive count, computed here (k is the method's own count, only checked) under the test's budget of 4:
    outliers above numpy's Q3 + 1.5 IQR, by descending attention (at most 3); PruMerge+ then the positions
    0, s, 2s, ... < 15 not already kept (s = (16 // outliers) // 3, 16 with no outlier), s widened while they do not
    fit in 3; then the extra token in the slot of the pruned token of highest attention."""
    a = _prumerge_cls_attention(model, inputs)
    q1, q3 = np.percentile(a, [25, 75])
    outliers = int((a > q3 + 1.5 * (q3 - q1)).sum())
    kept = [int(i) for i in np.argsort(-a, kind="stable")[:min(outliers, 3)]]
    if plus:
        step = max(1, 16 // outliers // 3) if outliers else 16
        samples = [p for p in range(0, 15, step) if p not in kept]
        while len(kept) + len(samples) > 3 and step < 16:
            step += 1
            samples = [p for p in range(0, 15, step) if p not in kept]
        kept += samples if len(kept) + len(samples) <= 3 else []
    kept.append(max((i for i in range(16) if i not in kept), key=lambda i: a[i]))
    assert len(kept) == k
    return sorted(kept)


def rule_prumerge_plus(model, inputs, k):
    return rule_prumerge(model, inputs, k, plus=True)


def rule_hired(model, inputs, k):
    """One crop (LLaVA-1.5): the whole budget to the top-k by the late layer's [CLS] row summed over heads; the late
    layer defaults to the feature layer (attentions[-2], layer 22 of CLIP-L's 24)."""
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2]
    return sorted(attn[0, :, 0, 1:].sum(0).topk(k).indices.tolist())


def rule_fopru(model, inputs, k):
    """rank strategy on the CLIP tower: the attention each patch receives at the feature layer, mean over every
    query ([CLS] included) and head."""
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2]
    return sorted(attn[0, :, :, 1:].mean((0, 1)).topk(k).indices.tolist())


def rule_hiprune(model, inputs, k):
    """alpha = 1 (RULE_PARAMS): round(k / 5) anchors by the eager attention each patch receives (mean over heads and
    every query) at the object layer, 9 of 24 scaled to the tiny tower's 3 layers = layer 1 (attentions[0]); their
    raster neighbours i - 1, i + 1, i - 4, i + 4 clamped to 0..15; then the feature layer's (attentions[-2]) best
    patches; the first k distinct."""
    attn = _eager_llava_vision(model, inputs["pixel_values"]).attentions
    shallow, deep = (attn[i][0, :, :, 1:].mean((0, 1)) for i in (0, -2))
    anchors = shallow.argsort(descending=True)[:round(k / 5)].tolist()
    order = anchors + [min(max(a + step, 0), 15) for step in (-1, 1, -4, 4) for a in anchors]
    order += deep.argsort(descending=True).tolist()
    return sorted(list(dict.fromkeys(order))[:k])


def rule_flowcut(model, inputs, k):
    """FlowCut with numpy on the 3-layer tiny CLIP: the feature layer -2 is encoder layer 1, so only layer 0 prunes
    (rpl = 1 - 0 - 1 = 0: straight to k patches). Score (a / sum a + sem / sum sem) * ||v||_1 from layer 0 on the
    embeddings: a = eager head-mean [CLS] row, sem = head-mean softmax of the unscaled v_cls . v_j, v the head-mean
    values; the top k. (tests/test_flowcut.py runs a deeper tower layer by layer.)"""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    layer = model.model.vision_tower.encoder.layers[0]
    with torch.no_grad():
        v = layer.self_attn.v_proj(layer.layer_norm1(out.hidden_states[0]))[0].double().numpy()
    heads = model.config.vision_config.num_attention_heads
    v = v.reshape(v.shape[0], heads, -1).transpose(1, 0, 2)  # (heads, 17, d)
    logits = np.einsum("hd,hjd->hj", v[:, 0], v)
    sem = (np.exp(logits - logits.max(1, keepdims=True)) / np.exp(logits - logits.max(1, keepdims=True)).sum(
        1, keepdims=True)).mean(0)[1:]
    a = out.attentions[0][0, :, 0, 1:].mean(0).double().numpy()
    score = (a / a.sum() + sem / sem.sum()) * np.abs(v.mean(0)[1:]).sum(1)
    return sorted(int(i) for i in np.argsort(-score, kind="stable")[:k])


def rule_idpruner(model, inputs, k):
    """IDPruner with numpy: importance = eager head-mean [CLS] attention (layer -2) min-max normalised; cosine of the
    projected tokens; the most important first, then argmax 0.5 imp - 0.5 max cos to the kept ones."""
    a = _eager_llava_vision(model, inputs["pixel_values"]).attentions[-2][0, :, 0, 1:].mean(0).double().numpy()
    imp = (a - a.min()) / (a.max() - a.min() + 1e-6)
    x = _features(model, inputs).double().numpy()
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    chosen = [int(np.argmax(imp))]
    while len(chosen) < k:
        score = 0.5 * imp - 0.5 * (x @ x[chosen].T).max(axis=1)
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
    return sorted(chosen)


def rule_scope(model, inputs, k):
    """SCOPE with numpy: saliency = eager [CLS] attention (layer -2, heads summed as the reference); features =
    hidden_states[-2] patches; each step argmax of sum_i max(0, cos_ij - c_i) * a_j, c_i = best cosine to the kept
    ones (0 before any)."""
    out = _eager_llava_vision(model, inputs["pixel_values"])
    a = out.attentions[-2][0, :, 0, 1:].sum(0).double().numpy()
    h = out.hidden_states[-2][0, 1:].double().numpy()
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    sim = h @ h.T
    covered, chosen = np.zeros(len(a)), []
    for _ in range(k):
        score = np.maximum(sim - covered[:, None], 0).sum(axis=0) * a
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
        covered = np.maximum(covered, sim[chosen[-1]])
    return sorted(chosen)


def rule_cdpruner(model, inputs, k):
    """CDPruner without a CLIP text tower, with numpy: r = min-max of the negated mean cosine of each projected token
    to the LLM input embeddings of the text after the image (no tokenizer: the instruction), + 1e-6 in the
    numerator; L = r_i cos_ij r_j; greedy: each step the index maximising det L[S + j]."""
    x = _features(model, inputs).double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        t = model.get_input_embeddings()(ids[int(_visual_columns(inputs)[-1]) + 1:]).double().numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    score = -(x @ t.T).mean(axis=1)
    r = (score - score.min() + 1e-6) / (score.max() - score.min())
    kernel = r[:, None] * (x @ x.T) * r[None, :]
    chosen: list[int] = []
    for _ in range(k):
        dets = [np.linalg.det(kernel[np.ix_(chosen + [j], chosen + [j])]) if j not in chosen else -np.inf
                for j in range(len(x))]
        chosen.append(int(np.argmax(dets)))
    return sorted(chosen)


RULES = {name.removeprefix("rule_"): fn for name, fn in globals().items() if name.startswith("rule_")}


def test_none_is_the_unpruned_model(family):
    model = tiny_model(family)
    inputs = tiny.batch(family, MIXED)
    reference = generate(model, inputs)
    pruner = mmprune.get("none")
    with pruner.attach(model):
        assert torch.equal(generate(model, inputs), reference)
    layers = model.config.text_config.num_hidden_layers
    for sample, ids in zip(pruner.stats["samples"], ([0], [1, 2], [3])):
        n = sum(tiny.tokens_per_image(family, i) for i in ids)
        assert sample["visual_tokens_after"] == n and sample["tokens_per_layer"] == [n] * layers


def test_every_method_has_a_reference_rule():
    assert sorted(RULES) == METHODS


@pytest.mark.parametrize("method", METHODS)
def test_kept_indices_equal_the_rule_computed_directly(method):
    """Pre-LLM: the kept set of a 4-token budget. In-LLM: the first stage's kept set (later stages score the
    sequence the engine built, which test_in_llm checks against eager attention)."""
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    pruner = mmprune.get(method, keep=4 if method in PRE_LLM + HYBRID else keep_for(method),
                         **RULE_PARAMS.get(method, {}))
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    image = pruner.stats["samples"][0]["images"][0]
    if method in PRE_LLM + HYBRID:  # hybrids: the pre-LLM stage (their in-LLM stages: test_in_llm)
        assert image["kept"] == RULES[method](model, inputs, image["after"])
        return
    kept, layer = image["stages"][0]["kept"], pruner.stats["stage_layers"][0]
    k = int(pruner._strengths[0] * 16) if method == "feather" else len(kept)
    assert kept == RULES[method](model, inputs, k, layer)


def test_pool_tokens_are_window_averages_of_projected_tokens():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    seen = []
    pruner = mmprune.get("pool", keep=4)
    with pruner.attach(model), torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
        model(**inputs)
        handle.remove()
    grid = _features(model, inputs).reshape(4, 4, -1)
    expected = grid.reshape(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)
    torch.testing.assert_close(seen[0][0, 3:7], expected, rtol=1e-5, atol=1e-6)


def test_random_differs_by_seed_and_by_image():
    model = tiny_model("llava")
    inputs = tiny.batch("llava", [[2, ("img", 0), ("img", 1), 2]])
    kept = {}
    for seed in (0, 1):
        pruner = mmprune.get("random", keep=4, seed=seed)
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
        kept[seed] = [image["kept"] for image in pruner.stats["samples"][0]["images"]]
    assert kept[0] != kept[1]
    assert kept[0][0] != kept[0][1]


def test_llava_next_fastervlm_scores_each_patch_by_its_own_crop():
    """The packed-token [CLS] scores follow HF's anyres packing: pack the eager per-crop [CLS] rows with the model's
    own pack_image_features (newlines scored -inf) and take the top-k."""
    model = tiny_model("llava_next")
    inputs = tiny.batch("llava_next", ONE_IMAGE)
    pixel_values = inputs["pixel_values"][0]  # (5 crops, 3, 32, 32)
    attn = _eager_llava_vision(model, pixel_values).attentions[-2]
    scores = attn[:, :, 0, 1:].mean(1).unsqueeze(-1)  # (crops, 16, 1)
    packed, _ = model.model.pack_image_features([scores], inputs["image_sizes"], "default",
                                                image_newline=torch.tensor([float("-inf")]))
    expected = sorted(packed[0][:, 0].topk(22).indices.tolist())
    pruner = mmprune.get("fastervlm", keep=22)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_fastervlm_uses_attention_received_at_the_last_vision_block(family_name):
    """Without [CLS], the score is the head-mean of the attention each merged token receives (mean over queries,
    mean over its 2x2 patches) at the last vision block. Reference: the block's own eager attention weights,
    recorded through a registered attention function, mapped back from window order as the model's merger does
    (Qwen2.5-VL; Qwen3-VL's tower has no windows)."""
    from transformers.vision_utils import get_vision_window_index

    model = tiny_model(family_name)
    inputs = tiny.batch(family_name, ONE_IMAGE)
    received = qwen_vision_attention_received(model, inputs, family_name)  # (heads, 16)
    if family_name == "qwen2_5_vl":
        window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2,
                                                  window_size=model.model.visual.window_size,
                                                  patch_size=model.model.visual.patch_size)
        received = received[:, torch.argsort(window_index)]
    expected = sorted(received.mean(0).topk(4).indices.tolist())

    pruner = mmprune.get("fastervlm", keep=4)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


@pytest.mark.parametrize("weighted", [True, False])
def test_tome_merges_the_strongest_edges_into_their_partners(weighted):
    """16 -> 10 on the tiny LLaVA's own tokens: one step with r = 6, written out with Python loops."""
    import torch.nn.functional as F

    model = tiny_model("llava")
    inputs = tiny.batch("llava", ONE_IMAGE)
    x = _features(model, inputs).float()
    a, b = list(range(0, 16, 2)), list(range(1, 16, 2))
    best = []
    for i in a:
        sims = [float(F.cosine_similarity(x[i], x[j], dim=0)) for j in b]
        best.append((max(sims), sims.index(max(sims))))
    order = sorted(range(8), key=lambda n: (-best[n][0], n))
    merging, unmerged = order[:6], order[6:]
    groups = {m: [b[m]] for m in range(8)}
    for n in merging:
        groups[best[n][1]].append(a[n])
    expected_slots = [a[n] for n in unmerged] + b
    expected = [x[a[n]] for n in unmerged] + [x[groups[m]].mean(0) for m in range(8)]
    pruner = mmprune.get("tome", keep=10, weighted=weighted)  # one step: every token holds one, both means agree
    seen = []
    original = pruner.select

    def spy(tokens, k):
        seen.append(original(tokens, k))
        return seen[-1]

    pruner.select = spy
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    (selection,) = seen
    assert selection.slots.tolist() == expected_slots and selection.merged == len({best[n][1] for n in merging})
    torch.testing.assert_close(selection.embeds.float(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_tome_weights_a_merged_token_by_the_tokens_it_holds():
    from mmprune.methods.tome import bipartite_merge

    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]])  # A = tokens 0, 2; B = tokens 1, 3
    size = torch.tensor([3.0, 1.0, 1.0, 1.0])  # token 0 already holds 3 original tokens
    slots = torch.arange(4)
    merged, kept, sizes = bipartite_merge(x, slots, size, 1, weighted=True)  # the strongest edge: 0 -> 1
    assert kept.tolist() == [2, 1, 3] and sizes.tolist() == [1.0, 4.0, 1.0]
    torch.testing.assert_close(merged[1], (3 * x[0] + x[1]) / 4)
    plain, _, _ = bipartite_merge(x, slots, size, 1, weighted=False)
    torch.testing.assert_close(plain[1], (x[0] + x[1]) / 2)


@pytest.mark.parametrize("start", [0, 1])
def test_llava_next_vtc_cls_sums_each_crops_cls_rows_over_the_layers(start):
    """Per crop, [CLS] rows (head-mean) summed over layers start .. L-2 of the eager tower, packed with the model's
    own pack_image_features (newlines never kept), top-k."""
    model = tiny_model("llava_next")
    inputs = tiny.batch("llava_next", ONE_IMAGE)
    attn = _eager_llava_vision(model, inputs["pixel_values"][0]).attentions
    scores = sum(a[:, :, 0, 1:].mean(1) for a in attn[start:-1]).unsqueeze(-1)  # (crops, 16, 1)
    packed, _ = model.model.pack_image_features([scores], inputs["image_sizes"], "default",
                                                image_newline=torch.tensor([float("-inf")]))
    expected = sorted(packed[0][:, 0].topk(22).indices.tolist())
    pruner = mmprune.get("vtc_cls", keep=22, start_layer=start)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected
    with pytest.raises(ValueError, match=r"start_layer=2 leaves no layer to sum in a 3-layer vision tower"):
        with mmprune.get("vtc_cls", start_layer=2).attach(model), torch.no_grad():
            model(**inputs)


@pytest.mark.parametrize("method, every_layer", [("fastervlm", False), ("vtc_cls", True)])
def test_every_clip_layer_is_captured_only_for_methods_that_read_them(method, every_layer):
    """Keeping every encoder layer's input alive costs memory on each forward: only a method that lists
    cls_attention_by_layer in its encoder_fields gets those hooks."""
    model = tiny_model("llava")
    with mmprune.get(method, keep=4).attach(model) as session, torch.no_grad():
        model(**tiny.batch("llava", ONE_IMAGE))
        assert ("clip_attn_in_0" in session.adapter.captured) is every_layer
