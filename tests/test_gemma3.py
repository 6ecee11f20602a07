"""Gemma 3: an image's kept tokens stay one bidirectional block, sliding-window layers keep their window after
pruning, received attention summed over each token's pooled patches, and the pooled features the projector reads.
The whole family suite runs on it through conftest's FAMILIES."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import record_selects, tiny_model

import mmprune
import tiny
from mmprune import upstream

PROMPT = [[3, ("img", 0), 2, ("img", 1), 5]]  # two images, so two blocks


def eager_copy(model):
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return eager


def compacted_inputs(model, inputs, kept: list[list[int]]):
    """The prompt with each image reduced to its ``kept`` tokens, as stock Gemma 3 inputs (embeddings given)."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        text = model.get_input_embeddings()(ids)
    rows, types, image = [], [], -1
    run = (ids == tiny.IMAGE_TOKEN).tolist()
    for position, is_image in enumerate(run):
        if is_image and (position == 0 or not run[position - 1]):
            image += 1
            rows += [features[image][k] for k in kept[image]]
            types += [1] * len(kept[image])
        elif not is_image:
            rows.append(text[position])
            types.append(0)
    embeds = torch.stack(rows)[None]
    return {"inputs_embeds": embeds, "attention_mask": torch.ones(1, embeds.shape[1], dtype=torch.long),
            "token_type_ids": torch.tensor([types])}


@pytest.mark.parametrize("method", ["fastervlm", "divprune"])
def test_kept_image_tokens_stay_one_bidirectional_block(method):
    """The pruned forward equals stock Gemma 3 run on the compacted prompt with the kept tokens marked as image
    tokens (each image's kept tokens one block), and differs from it run causally: the block is what is kept."""
    model = tiny_model("gemma3")
    inputs = tiny.batch("gemma3", PROMPT)
    pruner = mmprune.get(method, keep=6)
    with pruner.attach(model), torch.no_grad():
        pruned = model(**inputs).logits[0, -1]
    kept = [image["kept"] for image in pruner.stats["samples"][0]["images"]]
    assert [len(k) for k in kept] == [6, 6]
    manual = compacted_inputs(model, inputs, kept)
    with torch.no_grad():
        stock = model(**manual).logits[0, -1]
        causal = model(**{**manual, "token_type_ids": None}).logits[0, -1]
    torch.testing.assert_close(pruned, stock, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned, causal, rtol=1e-4, atol=1e-5)


def test_pruned_generation_with_a_short_sliding_window_equals_stock_on_the_compacted_prompt():
    """A window (6) shorter than an image's block (16) and the prompt: the local layers' masks are rebuilt for the
    compacted prompt and each decode step as the model builds them (AND(window, OR(causal, block)))."""
    model = tiny.gemma3(sliding_window=6)
    inputs = tiny.batch("gemma3", PROMPT)
    pruner = mmprune.get("fastervlm", keep=10)
    with pruner.attach(model), torch.no_grad():
        pruned = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    kept = [image["kept"] for image in pruner.stats["samples"][0]["images"]]
    assert greedy(model, compacted_inputs(model, inputs, kept), 6) == pruned.tolist()


def greedy(model, inputs: dict, steps: int) -> list[int]:
    """Greedy decoding on the default cache, the prefill from embeddings (``generate`` takes no inputs_embeds on
    Gemma 3): the prompt's blocks at prefill, causal steps after, as ``generate`` runs them."""
    tokens, mask = [], inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, use_cache=True,
                        **{upstream.cache_argument(model.forward): out.past_key_values})
    return tokens


@pytest.mark.parametrize("window", [64, 6])
def test_recomputed_attention_rows_equal_the_eager_weights_of_local_and_global_layers(monkeypatch, window):
    """What in-LLM methods score with, on every row: causal, the image block bidirectional, the window on local
    layers (layer 1 local, layer 2 global), equal to the model's own eager attention weights."""
    model = tiny.gemma3(sliding_window=window)
    inputs = tiny.batch("gemma3", PROMPT)
    with torch.no_grad():
        weights = eager_copy(model)(**inputs, output_attentions=True).attentions
    seen = {}
    fastv = mmprune.METHODS["fastv"]
    original = fastv.scores

    def scores(self, ctx, stage):
        length = ctx.mask.shape[1]
        rows = torch.arange(length).expand(1, -1)
        seen.update({layer: ctx.attention(layer, rows) for layer in (1, 2)})
        return original(self, ctx, stage)

    monkeypatch.setattr(fastv, "scores", scores)
    pruner = mmprune.get("fastv", keep=0.5, layer=3, query="all")
    pruner.watch = lambda num_layers, stage_layers: {1, 2}
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    for layer in (1, 2):
        torch.testing.assert_close(seen[layer], weights[layer].float(), rtol=1e-4, atol=1e-5)
    if window == 6:  # the last token sees the 6 nearest keys on the local layer, all of them on the global one
        far = inputs["input_ids"].shape[1] - 6
        assert seen[1][0, :, -1, :far].abs().max() == 0 and seen[2][0, :, -1, :far].min() > 0


def test_received_attention_is_summed_over_each_tokens_pooled_patches(monkeypatch):
    model = tiny_model("gemma3")
    inputs = tiny.batch("gemma3", [[3, ("img", 0), 4]])
    seen = record_selects(monkeypatch, mmprune.METHODS["fastervlm"])
    pruner = mmprune.get("fastervlm", keep=5)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        out = eager_copy(model).model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    received = out.attentions[-1][0].mean(dim=1)  # (heads, 64 patches): mean over every query of the image
    per_token = received.view(4, 4, 2, 4, 2).sum(dim=(2, 4)).reshape(4, 16)  # 8 x 8 patches -> 4 x 4 tokens
    tokens = seen[0][0]
    torch.testing.assert_close(tokens.get("token_attention"), per_token, rtol=1e-4, atol=1e-6)
    expected = sorted(per_token.mean(0).topk(5).indices.tolist())
    assert pruner.stats["samples"][0]["images"][0]["kept"] == expected


def test_vision_features_are_what_the_projector_reads(monkeypatch):
    model = tiny_model("gemma3")
    seen = record_selects(monkeypatch, mmprune.METHODS["visionzip"])
    with mmprune.get("visionzip", keep=8).attach(model), torch.no_grad():
        model(**tiny.batch("gemma3", [[3, ("img", 0), 4]]))
    tokens = seen[0][0]
    assert tokens.get("vision_features").shape == (16, 32) and not tokens.has("cls_feature")
    torch.testing.assert_close(tokens.project(tokens.get("vision_features")), tokens.embeds, rtol=1e-4, atol=1e-5)


def test_a_local_cache_that_forgot_tokens_beyond_its_window_refuses_to_select_among_them():
    """Removing tokens from an earlier layer's cache (SEATS' reference behaviour) needs the whole sequence; a local
    layer keeps only its window: refused in one line, while a cache still holding everything is gathered."""
    lm = tiny.gemma3(sliding_window=6).model.language_model
    cache = upstream.new_cache(lm.config)
    for length in (5, 10):
        keys = torch.randn(1, 2, length, 8)
        cache.update(keys, keys, 0)
        if length == 5:
            upstream.gather_cache_layer(cache, 0, torch.tensor([[0, 2, 4]]))
            assert cache.layers[0].keys.shape[2] == 3 and cache.get_seq_length(0) == 3
            torch.testing.assert_close(cache.layers[0].keys, keys[:, :, [0, 2, 4]])
    with pytest.raises(ValueError, match="sliding-window layer whose cache kept only the last 5 of 13 tokens"):
        upstream.gather_cache_layer(cache, 0, torch.tensor([[0, 1, 2]]))
