"""Qwen3.5: received attention at the last vision block (no [CLS], no DeepStack), and a hybrid decoder whose linear
layers (Gated DeltaNet) keep a conv and a recurrent state instead of a KV cache: pre-LLM pruning must leave those
states equal to the unpruned model's on the compacted sequence, padded or not, prefill or decode. The 4-layer tiny
model (layers 0-2 linear, layer 3 full attention) also runs the whole family suite (conftest's FAMILIES)."""

from __future__ import annotations

import pytest
import torch
from conftest import SCORES_AT_LINEAR_LAYERS, method_for_tiny, qwen_vision_attention_received, tiny_model
from test_in_llm import final, record, with_tokens

import mmprune
import tiny
from mmprune import upstream

STEPS = 4
LINEAR, FULL = [0, 1, 2], 3


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **kwargs)


def compacted_reference(model, inputs, kept: list[int]):
    """The unpruned language model run on the prompt with only the ``kept`` image tokens (the image's features at
    their slots, every token at its original M-RoPE position), built from the model's own pieces: returns its
    output (last hidden state, cache)."""
    ids = inputs["input_ids"]
    inner = model.model
    with torch.no_grad():
        positions, _ = inner.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
        features = torch.cat(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds = inner.get_input_embeddings()(ids)
        image = (ids[0] == tiny.IMAGE_TOKEN).nonzero().squeeze(1)
        embeds[0, image] = features
        text = (ids[0] != tiny.IMAGE_TOKEN).nonzero().squeeze(1)
        keep = torch.sort(torch.cat([text, image[kept]])).values
        return inner.language_model(inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep],
                                    use_cache=True)


def test_fastervlm_keeps_the_tokens_that_receive_most_attention_at_the_last_vision_block():
    model = tiny_model("qwen3_5")
    inputs = tiny.batch("qwen3_5", [[3, ("img", 1), 4]])  # 8 x 12 patches: 4 x 6 merged tokens
    expected = sorted(qwen_vision_attention_received(model, inputs, "qwen3_5").mean(0).topk(6).indices.tolist())
    pruner = mmprune.get("fastervlm", keep=6)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["family"] == "qwen3.5"
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


def test_keep_all_generates_the_unpruned_tokens_on_images_and_videos():
    """A video's grids sit in separate timestamped spans (Qwen3-VL's layout)."""
    model = tiny_model("qwen3_5")
    inputs = tiny.batch("qwen3_5", [[2, ("img", 0), 3, ("vid", 1), 2], [1, ("img", 1), 4]])
    reference = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
    pruner = mmprune.get("uniform", keep=1.0)
    with pruner.attach(model):
        out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), rtol=1e-5, atol=1e-5)
    assert pruner.stats["samples"][0]["videos"][0]["before"] == 48


def test_cached_decoding_equals_an_uncached_replay_on_a_padded_batch():
    """Each decode step's logits on the pruned caches (the full-attention layer's KV, the linear layers' states)
    equal one uncached pass over the pruned prompt and the generated tokens; the samples are left-padded."""
    model = tiny_model("qwen3_5")
    inputs = tiny.batch("qwen3_5", [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), 1]])
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model):
        out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences
        assert not bool((tokens[:, -STEPS:] == tiny.IMAGE_TOKEN).any()), "a generated placeholder would be re-encoded"
        full = dict(inputs, input_ids=tokens,
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, -STEPS:])], 1),
                    mm_token_type_ids=(tokens == tiny.IMAGE_TOKEN).int())
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits
    decoded = torch.stack(out.logits, dim=1)  # (B, steps, vocab)
    torch.testing.assert_close(logits[:, -STEPS - 1:-1], decoded, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[:, -STEPS - 1:-1].argmax(-1), tokens[:, -STEPS:])


def test_a_pruned_video_keeps_its_grids_apart_and_decodes_as_an_uncached_replay():
    """Each temporal grid sits after its timestamp in its own vision span; a uniform half of each survives in its
    slots, and decoding continues from the original M-RoPE ids."""
    model = tiny_model("qwen3_5")
    inputs = tiny.batch("qwen3_5", [[2, ("vid", 0), 3]])
    pruner = mmprune.get("uniform", keep=0.5)
    with pruner.attach(model):
        out = generate(model, inputs, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences
        full = dict(inputs, input_ids=tokens, attention_mask=torch.ones_like(tokens),
                    mm_token_type_ids=2 * (tokens == tiny.VIDEO_TOKEN).int())
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits
    assert pruner.stats["samples"][0]["videos"][0]["kept_per_frame"] == [8, 8]
    torch.testing.assert_close(logits[0, -STEPS - 1:-1], torch.stack(out.logits, dim=1)[0], rtol=1e-4, atol=1e-4)


def test_a_left_padded_batch_equals_each_sample_alone_in_tokens_and_linear_states():
    """Padded positions reach the linear layers zeroed, so each sample's conv and recurrent states after the
    pruned prefill are the ones it gets alone."""
    model = tiny_model("qwen3_5")
    samples = [[3, ("img", 0), 4], [6, ("img", 1), 2, ("img", 2), 1], [1, ("img", 3), 9]]
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model), torch.no_grad():
        batch = tiny.batch("qwen3_5", samples)
        tokens = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        cache = upstream.output_cache(model(**batch, use_cache=True))
        for i, sample in enumerate(samples):
            alone = tiny.batch("qwen3_5", [sample])
            assert torch.equal(model.generate(**alone, max_new_tokens=STEPS, do_sample=False)[0, -STEPS:],
                               tokens[i, -STEPS:])
            own = upstream.output_cache(model(**alone, use_cache=True))
            for layer in LINEAR:
                for batched, single in zip(upstream.linear_attention_states(cache, layer),
                                           upstream.linear_attention_states(own, layer)):
                    torch.testing.assert_close(batched[i], single[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fastervlm", "divprune", "visionzip"])
def test_caches_hold_exactly_the_tokens_that_entered_the_decoder(method):
    """The full-attention layer caches text + kept tokens; every linear layer's conv and recurrent states equal
    those of the unpruned language model run on the compacted sequence (the image's kept tokens in their slots, at
    their original positions). The image ends two tokens before the prompt does, so the 4-wide conv state holds a
    kept image token. VisionZip merges tokens (its contextual tokens are new embeddings the reference built here
    does not have): for it only the lengths are checked."""
    model = tiny_model("qwen3_5")
    inputs = tiny.batch("qwen3_5", [[3, ("img", 0), 2]])
    text = int((inputs["input_ids"] != tiny.IMAGE_TOKEN).sum())
    pruner = mmprune.get(method, keep=0.25)
    with pruner.attach(model), torch.no_grad():
        pruned = model(**inputs, use_cache=True)
    cache = upstream.output_cache(pruned)
    image = pruner.stats["samples"][0]["images"][0]
    assert cache.get_seq_length(FULL) == text + image["after"] == text + 4
    assert cache.get_seq_length() == text + 4  # what the engine reads as the prompt length (layer 0 is linear)
    if image["merged"]:
        return
    reference = compacted_reference(model, inputs, image["kept"])
    states = upstream.output_cache(reference)
    for layer in LINEAR:
        for got, expected in zip(upstream.linear_attention_states(cache, layer),
                                 upstream.linear_attention_states(states, layer)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(cache.layers[FULL].keys, states.layers[FULL].keys):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected_logits = model.lm_head(reference.last_hidden_state[:, -1])
    torch.testing.assert_close(pruned.logits[:, -1], expected_logits, rtol=1e-5, atol=1e-5)


def test_the_moe_variant_prunes_through_the_same_adapter():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    dense = tiny_model("qwen3_5").config
    text = dict(dense.text_config.to_dict(), moe_intermediate_size=32, shared_expert_intermediate_size=32,
                num_experts=4, num_experts_per_tok=2)
    for key in ("model_type", "intermediate_size"):
        text.pop(key, None)
    cfg = Qwen3_5MoeConfig(vision_config=dense.vision_config.to_dict(), text_config=text,
                           image_token_id=tiny.IMAGE_TOKEN, video_token_id=tiny.VIDEO_TOKEN,
                           vision_start_token_id=tiny.VISION_START, vision_end_token_id=tiny.VISION_END)
    model = Qwen3_5MoeForConditionalGeneration(cfg).eval()
    inputs = tiny.batch("qwen3_5", [[2, ("img", 0), 3], [1, ("img", 1), 4]])
    reference = generate(model, inputs)
    with mmprune.get("fastervlm", keep=1.0).attach(model):
        assert torch.equal(generate(model, inputs), reference)
    pruner = mmprune.get("fastervlm", keep=0.25)
    with pruner.attach(model):
        generate(model, inputs)
    assert pruner.stats["family"] == "qwen3.5"
    assert [s["visual_tokens_after"] for s in pruner.stats["samples"]] == [4, 6]


def test_in_llm_decoding_on_the_pruned_caches_equals_an_uncached_replay():
    """FastV on an 8-layer model (full attention at layers 3 and 7): it scores at layer 3 and the kept tokens enter
    layer 4, a linear layer whose states then hold the compacted sequence while layers 0-3 hold the whole prompt;
    each decode step equals one uncached pass that applies the same selection at the same layer."""
    model = tiny.qwen3_5(layers=8)
    inputs = tiny.batch("qwen3_5", [[3, ("img", 0), 4]])
    pruner = mmprune.get("fastv", keep=0.5, layer=4)
    out, replay = record(pruner, model, lambda: model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True))
    assert pruner.stats["stage_layers"] == [4]
    assert pruner.stats["samples"][0]["tokens_per_layer"] == [16] * 4 + [8] * 4
    with replay.attach(model), torch.no_grad():
        logits = model(**with_tokens(inputs, out.sequences), use_cache=False).logits
    assert final(replay.stats) == final(pruner.stats)
    decoded = torch.stack(out.logits, dim=1)[0]
    torch.testing.assert_close(logits[0, -STEPS - 1:-1], decoded, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[0, -STEPS - 1:-1].argmax(-1), out.sequences[0, -STEPS:])


def test_in_llm_attention_rows_equal_the_gated_attention_layers_eager_weights(monkeypatch):
    """The attention row FastV recomputes at full-attention layer 3 (its q_proj yields a query and an output gate
    per head; M-RoPE turns the first quarter of each head's dimensions) equals that row of the layer's eager
    attention weights."""
    import copy

    from mmprune.engine.layers import StageContext

    model = tiny.qwen3_5(layers=8)
    inputs = tiny.batch("qwen3_5", [[3, ("img", 0), 4]])
    calls = []
    original = StageContext.attention

    def spy(ctx, layer, queries, rope=True, on=None):
        probs = original(ctx, layer, queries, rope, on)
        calls.append((layer, queries.clone(), probs))
        return probs

    monkeypatch.setattr(StageContext, "attention", spy)
    with mmprune.get("fastv", keep=0.5, layer=4).attach(model), torch.no_grad():
        model(**inputs)
    (layer, queries, probs), = calls
    assert layer == FULL
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    weights = {}

    def keep_weights(module, args, output):
        weights["rows"] = output[1]  # returns None: the output is unchanged

    hook = eager.model.language_model.layers[FULL].self_attn.register_forward_hook(keep_weights)
    try:
        with torch.no_grad():
            eager(**inputs)
    finally:
        hook.remove()
    torch.testing.assert_close(probs[0], weights["rows"][0][:, queries[0]].float(), rtol=1e-4, atol=1e-5)


def test_the_flops_model_refuses_the_linear_attention_layers():
    """Counting Gated DeltaNet layers as softmax attention would print wrong FLOPs."""
    from mmprune.bench.flops import Geometry

    with pytest.raises(ValueError, match=r"does not cover Qwen3_5Config yet .*linear-attention"):
        Geometry.from_config(tiny_model("qwen3_5").config)


# Attention-scored in-LLM methods with stage layers that score at the 8-layer model's attention layers (3 and 7)
AT_ATTENTION_LAYERS = {"dart": dict(layer=4), "fastv": dict(layer=4), "pyramiddrop": dict(layers=[3, 7]),
                       "feather": dict(layers=[4], keep=0.75)}


@pytest.mark.parametrize("method", SCORES_AT_LINEAR_LAYERS)
def test_a_method_scoring_at_a_linear_layer_is_refused_naming_the_attention_layers(method):
    """Linear-attention layers have no attention weights: a method whose schedule scores at one is refused in one
    line naming the model's attention layers, never scored with something else."""
    model = tiny_model("qwen3_5")
    with pytest.raises(ValueError, match=r"reads the attention of decoder layer [0-2], which is linear_attention "
                                         r"\(no attention weights\); this model's attention layers are \[3\]"):
        with method_for_tiny(method, keep=0.5).attach(model), torch.no_grad():
            model(**tiny.batch("qwen3_5", [[3, ("img", 0), 4]]))


def test_every_other_in_llm_method_runs_with_its_defaults():
    """The list the family suite skips is exactly the methods that score at a linear layer by default."""
    model = tiny_model("qwen3_5")
    others = sorted(set(name for name, cls in mmprune.METHODS.items() if hasattr(cls, "plan"))
                    - set(SCORES_AT_LINEAR_LAYERS))
    assert "todre" in others
    for method in others:
        with method_for_tiny(method).attach(model), torch.no_grad():
            model(**tiny.batch("qwen3_5", [[3, ("img", 0), 4]]))


@pytest.mark.parametrize("method", sorted(AT_ATTENTION_LAYERS))
def test_methods_scoring_at_attention_layers_keep_the_contract(method):
    """keep=1.0 equals the unpruned model; a left-padded batch equals each sample alone; the attention layers'
    caches hold text + the tokens that reached them; cached decoding equals an uncached replay."""
    model = tiny.qwen3_5(layers=8)
    params = dict(AT_ATTENTION_LAYERS[method])
    pruned = {"keep": 0.5, **params}  # feather needs a larger budget with its stage at layer 4
    params.pop("keep", None)
    inputs = tiny.batch("qwen3_5", [[3, ("img", 0), 4], [6, ("img", 1), 2]])
    with torch.no_grad():
        reference = model(**inputs).logits
        with mmprune.get(method, keep=1.0, **params).attach(model):
            torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-5, atol=1e-5)
    pruner = mmprune.get(method, **pruned)
    with pruner.attach(model), torch.no_grad():
        batched = model(**inputs, use_cache=True)
    stats = pruner.stats
    text = (inputs["input_ids"] != tiny.IMAGE_TOKEN) & inputs["attention_mask"].bool()
    for layer in (3, 7):
        longest = max(int(text[i].sum()) + s["tokens_per_layer"][layer] for i, s in enumerate(stats["samples"]))
        assert batched.past_key_values.get_seq_length(layer) == longest
    for i, sample in enumerate([[3, ("img", 0), 4], [6, ("img", 1), 2]]):
        with pruner.attach(model), torch.no_grad():
            alone = model(**tiny.batch("qwen3_5", [sample])).logits[0, -1]
        assert pruner.stats["samples"][0]["images"] == stats["samples"][i]["images"]
        torch.testing.assert_close(alone, batched.logits[i, -1], rtol=1e-4, atol=1e-4)
    single = tiny.batch("qwen3_5", [[3, ("img", 0), 4]])
    out, replay = record(mmprune.get(method, **pruned), model, lambda: model.generate(
        **single, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True))
    with replay.attach(model), torch.no_grad():
        logits = model(**with_tokens(single, out.sequences), use_cache=False).logits
    torch.testing.assert_close(logits[0, -STEPS - 1:-1], torch.stack(out.logits, dim=1)[0], rtol=1e-4, atol=1e-4)
