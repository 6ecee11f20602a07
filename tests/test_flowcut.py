"""FlowCut: progressive pruning inside the CLIP tower, checked against an independent layer-by-layer run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmprune
import tiny
from mmprune.bench.flops import Geometry, prefill_flops, tower_counts, vision_flops
from mmprune.bench.sweep import flops_of
from mmprune.methods.flowcut import FlowCutPruner, prune_count

SIDE = 6  # 48 px / patch 8: 36 patches + [CLS]
LAYERS = 8  # feature layer -2 = encoder layer 6: layers 0..5 score, layers 1, 3, 5 (rpl 4, 2, 0) prune
FEATURE = LAYERS - 2


def deep_llava(seed: int = 0, sharp: float = 10.0, strategy: str = "default") -> LlavaForConditionalGeneration:
    """A tiny LLaVA with an 8-layer CLIP; q/k weights scaled by ``sharp`` so [CLS] attention is peaked enough for
    the entropy rule to prune at intermediate layers (random init gives near-uniform attention: no pruning)."""
    torch.manual_seed(seed)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                            image_size=8 * SIDE, patch_size=8, projection_dim=16)
    cfg = LlavaConfig(vision_config=clip, text_config=LlamaConfig(**tiny._text()), image_token_id=tiny.IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(sharp)
            layer.self_attn.k_proj.weight.mul_(sharp)
    return model


def pixels(image: int) -> torch.Tensor:
    return torch.randn(1, 3, 8 * SIDE, 8 * SIDE, generator=torch.Generator().manual_seed(1000 + image))


def deep_inputs(samples: list[tuple[int, int]], tokens: int = SIDE * SIDE) -> dict:
    """One image per sample, ``(image id, text length after it)``, left-padded."""
    rows = [[5, 6, 7] + [tiny.IMAGE_TOKEN] * tokens + [8 + j for j in range(after)] for _, after in samples]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tiny.PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([pixels(i) for i, _ in samples])}


def reference(model, pixel_values: torch.Tensor, kept_patches: int):
    """FlowCut computed directly, layer by layer, in float64 numpy for the scores: each layer runs on the tokens
    left; layers l < f score from their own attention on their input and prune when f - l - 1 is even. Returns the
    kept patch indices, the tokens entering each layer, and the feature layer's output for its patches (the kept
    ones, in original order)."""
    tower = model.model.vision_tower
    heads = model.config.vision_config.num_attention_heads
    target = kept_patches + 1
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    alive = np.arange(h.shape[1])
    counts, ema, feature = [], None, None
    for index, layer in enumerate(tower.encoder.layers):
        counts.append(h.shape[1])
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.layer_norm1(h)
            q, k, v = (p(x)[0].double().numpy() for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            out = layer(h, None)
        n = h.shape[1]
        q, k, v = (t.reshape(n, heads, -1).transpose(1, 0, 2) for t in (q, k, v))
        rpl = FEATURE - index - 1
        keep = None
        if n > target and rpl >= 0:
            def softmax(z):
                e = np.exp(z - z.max(-1, keepdims=True))
                return e / e.sum(-1, keepdims=True)

            a = softmax(np.einsum("hd,hjd->hj", q[:, 0], k) * attn.scale).mean(0)[1:]
            sem = softmax(np.einsum("hd,hjd->hj", v[:, 0], v)).mean(0)[1:]
            score = (a / a.sum() + sem / sem.sum()) * np.abs(v.mean(0)[1:]).sum(-1)
            ema = score if ema is None else 0.5 * ema + 0.5 * score
            if rpl % 2 == 0:
                if rpl:
                    p = a / a.sum()
                    ratio = -(p * np.log(p)).sum() / math.log(n - 1)
                    pruned = round((n - 1 - kept_patches) / math.sqrt(rpl) * (1 - ratio**2))
                else:
                    pruned = n
                after = max(n - pruned, target)
                keep = np.sort(np.argsort(-ema, kind="stable")[:after - 1])
                ema = ema[keep]
        if index == FEATURE:
            feature = out[0, 1:]
        if keep is not None:
            out = torch.cat([out[:, :1], out[:, 1:][:, torch.from_numpy(keep)]], dim=1)
            alive = np.concatenate([alive[:1], alive[1:][keep]])
        h = out
    return sorted(int(i) - 1 for i in alive[1:]), counts, feature


def attached_run(model, inputs, keep):
    pruner = mmprune.get("flowcut", keep=keep)
    with pruner.attach(model), torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        logits = model(**inputs).logits
    return pruner.stats, features, logits


def test_kept_tokens_counts_and_features_equal_the_layer_by_layer_reference():
    model = deep_llava()
    inputs = deep_inputs([(0, 2), (1, 3), (2, 1)])
    stats, features, _ = attached_run(model, inputs, keep=6)
    images = [s["images"][0] for s in stats["samples"]]
    for i, image in enumerate(images):
        kept, counts, feature = reference(model, inputs["pixel_values"][i:i + 1], 6)
        assert image["kept"] == kept and image["after"] == 6
        assert image["encoder_tokens_per_layer"] == counts
        index = torch.tensor(kept)
        with torch.no_grad():
            expected = model.model.multi_modal_projector(feature)  # the kept patches, in original order
        torch.testing.assert_close(features[i][index], expected, rtol=1e-5, atol=1e-5)
        pruned = torch.ones(SIDE * SIDE, dtype=torch.bool)
        pruned[index] = False
        assert torch.equal(features[i][pruned], torch.zeros(int(pruned.sum()), features[i].shape[-1]))


def test_per_layer_counts_follow_the_schedule():
    """Tokens only leave between layer l and l + 1 for l < f with f - l - 1 even; layer f (the feature layer) and
    those after it run on [CLS] + k; at least one intermediate layer prunes, so the entropy rule is exercised."""
    model = deep_llava()
    stats, _, _ = attached_run(model, deep_inputs([(0, 2), (1, 2), (2, 2), (3, 2)]), keep=6)
    intermediate = set()
    for sample in stats["samples"]:
        counts = sample["images"][0]["encoder_tokens_per_layer"]
        assert len(counts) == LAYERS and counts[0] == SIDE * SIDE + 1
        for layer in range(1, LAYERS):
            pruning = layer - 1 < FEATURE and (FEATURE - layer) % 2 == 0
            assert counts[layer] <= counts[layer - 1] if pruning else counts[layer] == counts[layer - 1]
        assert counts[FEATURE:] == [7] * (LAYERS - FEATURE)
        intermediate.add(tuple(counts[:FEATURE]))
        assert counts[2] < counts[1]  # layer 1 (rpl 4) pruned something
    assert len(intermediate) > 1, "the images should keep different counts at intermediate layers"


def test_prune_count_by_hand():
    # uniform attention: entropy ratio 1, nothing pruned before the last layer
    assert prune_count(torch.full((16,), 0.5), 4, 4) == 0
    # all of the attention on one patch (the rest 0, 0 log 0 = 0): ratio 0, (16 - 4) / sqrt(4) = 6
    assert prune_count(torch.tensor([1.0] + [0.0] * 15), 4, 4) == 6
    # two patches share it: H = log 2, ratio 1/4, (16 - 4) / sqrt(2) * 15/16 = 7.95... -> 8
    assert prune_count(torch.tensor([0.3, 0.3] + [0.0] * 14), 2, 4) == 8
    assert round(12 / math.sqrt(2) * 15 / 16) == 8


def test_a_batch_equals_each_image_alone():
    model = deep_llava()
    samples = [(0, 2), (1, 4), (2, 1)]
    stats, _, logits = attached_run(model, deep_inputs(samples), keep=6)
    counts = {tuple(s["images"][0]["encoder_tokens_per_layer"]) for s in stats["samples"]}
    assert len(counts) > 1, "the batch should hold images with different intermediate counts"
    for i, sample in enumerate(samples):
        alone_stats, _, alone = attached_run(model, deep_inputs([sample]), keep=6)
        assert alone_stats["samples"][0]["images"][0] == stats["samples"][i]["images"][0]
        torch.testing.assert_close(logits[i, -1], alone[0, -1], rtol=1e-5, atol=1e-5)


def test_keep_all_is_the_stock_model_and_runs_the_whole_tower():
    model = deep_llava()
    inputs = deep_inputs([(0, 2), (1, 3)])
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    stats, _, logits = attached_run(model, inputs, keep=1.0)
    assert torch.equal(logits, reference_logits)
    for sample in stats["samples"]:
        image = sample["images"][0]
        assert image["kept"] == list(range(SIDE * SIDE))
        assert image["encoder_tokens_per_layer"] == [SIDE * SIDE + 1] * LAYERS


def test_detach_removes_every_encoder_hook():
    model = deep_llava()
    inputs = deep_inputs([(0, 2), (1, 3)])
    tower = model.model.vision_tower
    modules = [tower, *tower.modules()]

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    with torch.no_grad():
        stock = model(**inputs).logits
    before_hooks = hooks()  # transformers' own output-capturing hooks, installed at the first forward
    pruner = mmprune.get("flowcut", keep=4)
    with pruner.attach(model), torch.no_grad():
        assert "forward" in tower.__dict__ and hooks() > before_hooks
        assert not torch.equal(model(**inputs).logits, stock)
    assert "forward" not in tower.__dict__ and hooks() == before_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)
    with pytest.raises(RuntimeError, match="boom"):
        with pruner.attach(model), torch.no_grad():
            model(**inputs)
            raise RuntimeError("boom")
    assert "forward" not in tower.__dict__ and hooks() == before_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock)


def test_full_strategy_counts_cls_among_the_kept_tokens():
    """``vision_feature_select_strategy="full"``: the LLM receives [CLS] as token 0 of each image, always kept and
    counted in the budget, as the reference's cls_patch mode."""
    model = deep_llava(strategy="full")
    inputs = deep_inputs([(0, 2)], tokens=SIDE * SIDE + 1)
    stats, _, _ = attached_run(model, inputs, keep=7)
    image = stats["samples"][0]["images"][0]
    kept, counts, _ = reference(model, inputs["pixel_values"], 6)
    assert image["kept"] == [0] + [p + 1 for p in kept]
    assert image["encoder_tokens_per_layer"] == counts


def test_stats_are_json_with_the_encoder_counts():
    model = tiny_model("llava")
    pruner = mmprune.get("flowcut", keep=4)
    with pruner.attach(model), torch.no_grad():
        model.generate(**tiny.batch("llava", [[3, ("img", 0), 4]]), max_new_tokens=2, do_sample=False)
    image = json.loads(json.dumps(pruner.stats))["samples"][0]["images"][0]
    # the 3-layer tiny tower: feature layer 1, so layer 0 prunes straight to [CLS] + 4 patches
    assert image["encoder_tokens_per_layer"] == [17, 5, 5] and image["after"] == 4


@pytest.mark.parametrize("family, name", [("llava_next", "llava-next"), ("llava_next_video", "llava-next-video"),
                                          ("llava_onevision", "llava-onevision"), ("qwen2_vl", "qwen2-vl"),
                                          ("qwen2_5_vl", "qwen2-vl"), ("qwen3_vl", "qwen3-vl")])
def test_other_families_are_refused_at_attach_with_the_reason(family, name):
    model = tiny_model(family)
    with pytest.raises(ValueError, match=f"flowcut .*LLaVA-1.5 .*; {name} is refused: .+"):
        mmprune.get("flowcut").attach(model)
    assert "forward" not in model.model.vision_tower.__dict__ if hasattr(model.model, "vision_tower") else True


def test_the_adapter_refuses_too_when_a_family_is_let_through(monkeypatch):
    monkeypatch.setattr(FlowCutPruner, "families", ("llava", "llava-next"))
    with pytest.raises(ValueError, match="implements for LLaVA-1.5's CLIP tower only, not for llava-next"):
        mmprune.get("flowcut").attach(tiny_model("llava_next"))


def test_a_llava_with_a_siglip_tower_is_refused():
    from transformers import SiglipVisionConfig

    torch.manual_seed(0)
    siglip = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=siglip, text_config=LlamaConfig(**tiny._text()), image_token_id=tiny.IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="siglip_vision_model tower has none"):
        mmprune.get("flowcut").attach(LlavaForConditionalGeneration(cfg).eval())


def test_several_feature_layers_are_refused():
    model = tiny.llava()
    model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="one integer vision_feature_layer"):
        mmprune.get("flowcut").attach(model)
    model.config.vision_feature_layer = 1  # the first layer's output: no layer before it to prune at
    with pytest.raises(ValueError, match="selects encoder layer 0"):
        mmprune.get("flowcut").attach(model)


# ---------------------------------------------------------------------------------------------------- FLOPs
def clip_layer(n):  # tiny CLIP d=32, m=64: Q,K,V,O 2*n*32*32 each; QK^T and AV 2*n*n*32 each; MLP 2 x 2*n*32*64
    return 2 * n * 32 * 32 * 4 + 2 * n * n * 32 * 2 + 2 * n * 32 * 64 * 2


def test_the_flops_model_counts_the_shortened_encoder_by_hand():
    g = Geometry.from_config(tiny_model("llava").config)
    assert clip_layer(17) == 315520 and clip_layer(5) == 85120
    embedding = 2 * 16 * 192 * 32  # 16 patches of 3 * 8 * 8 to d = 32
    projector = 2 * 4 * 32 * 32 * 2  # 4 kept tokens through 32 -> 32 -> 32
    assert vision_flops(g, 1, visual_tokens=4, encoder_tokens=[[17, 5, 5]]) == (
        embedding + 315520 + 2 * 85120 + projector) == 698752
    # two crops, one shortened, one whole
    assert vision_flops(g, 2, encoder_tokens=[[17, 17, 5]]) == 2 * embedding + 5 * 315520 + 85120
    with pytest.raises(ValueError, match="one count per encoder layer"):
        vision_flops(g, 1, encoder_tokens=[[17, 5]])


def test_flops_of_a_flowcut_run_counts_its_encoder_and_projector():
    model = tiny_model("llava")
    pruner = mmprune.get("flowcut", keep=4)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch("llava", [[3, ("img", 0), 4]]))
    sample = pruner.stats["samples"][0]
    assert tower_counts(sample) == {"encoder_tokens": [[17, 5, 5]], "projected": 4}
    g = Geometry.from_config(model.config)
    expected = prefill_flops(g, 7, [4] * 4, 1, 16, projected=4, encoder_tokens=[[17, 5, 5]])
    assert expected["vision"] == 698752
    assert flops_of(g, {"text_tokens": [7], "sample_stats": [sample]}) == expected["total"]
    fastervlm = prefill_flops(g, 7, [4] * 4, 1, 16)  # same LLM tokens, whole tower and projector
    assert fastervlm["total"] - expected["total"] == 2 * (clip_layer(17) - clip_layer(5)) + 2 * 12 * 32 * 32 * 2
    assert np.isclose(fastervlm["llm"], expected["llm"])
