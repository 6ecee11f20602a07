"""The Qwen2.5-Omni thinker: audio clips as media items next to images and videos, interleaved audio-in-video,
keep_audio, and the refusals (speech output, the full model, releases before the standard layout)."""

from __future__ import annotations

import pytest
import torch
from conftest import method_for_tiny, omni_supported, tiny_model

import mmprune
import tiny
from mmprune.engine.session import final_kept

FAMILY = "qwen2_5_omni"
OMNI = ["qwen2_5_omni", "qwen3_omni"]
GEN = dict(max_new_tokens=3, do_sample=False)
AUDIO_METHODS = sorted(name for name, cls in mmprune.METHODS.items() if cls.prunes("audio"))


def interleaved() -> dict:
    """A video of 4 temporal grids (1 s each) with its 4 s audio track, as the processor lays them out with
    use_audio_in_video: per 2 s chunk, the chunk's video tokens then its audio tokens."""
    video = tiny.video_pixels(FAMILY, 0)
    pixels = video["pixel_values_videos"]
    video["pixel_values_videos"] = torch.cat([pixels, pixels.flip(0)])  # 4 grids of 8 x 8 patches
    video["video_grid_thw"] = torch.tensor([[4, 8, 8]])
    per_chunk_video, per_chunk_audio = 2 * 16, 50
    ids = [5, 6, tiny.VISION_START, tiny.AUDIO_START]
    for _ in range(2):
        ids += [tiny.VIDEO_TOKEN] * per_chunk_video + [tiny.AUDIO_TOKEN] * per_chunk_audio
    ids += [tiny.AUDIO_END, tiny.VISION_END, 7, 8]
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=video["pixel_values_videos"],
                video_grid_thw=video["video_grid_thw"], video_second_per_grid=torch.tensor([1.0]),
                input_features=torch.randn(1, tiny.MEL_BINS, 400, generator=g),
                feature_attention_mask=torch.ones(1, 400, dtype=torch.long), use_audio_in_video=True)


LAYOUTS = {
    "audio only": lambda family: tiny.batch(family, [[3, ("aud", 0), 4]]),
    "video only": lambda family: tiny.batch(family, [[3, ("vid", 0), 4]]),
    "audio in video": lambda family: interleaved(),
    "image + audio": lambda family: tiny.batch(family, [[2, ("img", 0), 3, ("aud", 1), 2]]),
    "padded batch": lambda family: tiny.batch(family, [[2, ("aud", 0), 3], [4, ("img", 1), 1, ("aud", 1), 2]]),
}
CASES = [(family, layout) for family in OMNI for layout in LAYOUTS
         if not (family == "qwen3_omni" and layout == "audio in video")]  # Qwen3 interleaves token by token


@pytest.mark.parametrize("method", AUDIO_METHODS + ["none"])
@pytest.mark.parametrize("family, layout", CASES)
def test_keep_all_reproduces_the_unpruned_thinker(family, layout, method):
    model = tiny_model(family)
    inputs = LAYOUTS[layout](family)
    with torch.no_grad():
        reference = model.generate(**inputs, **GEN)
        logits = model(**inputs).logits
    pruner = method_for_tiny(method, keep=1.0, keep_audio=1.0) if method != "none" else mmprune.get("none")
    with pruner.attach(model), torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GEN), reference)
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", AUDIO_METHODS)
@pytest.mark.parametrize("family", OMNI)
def test_a_padded_batch_equals_each_sample_alone(family, method):
    model = tiny_model(family)
    samples = [[2, ("aud", 0), 3], [4, ("img", 1), 1, ("aud", 1), 2], [1, ("vid", 1), 2, ("aud", 2), 1]]
    pruner = method_for_tiny(method, keep=0.5, keep_audio=0.4)
    with pruner.attach(model), torch.no_grad():
        batch = model.generate(**tiny.batch(family, samples), **GEN)
        audios = final_kept(pruner.stats, "audio")
        for i, sample in enumerate(samples):
            alone = model.generate(**tiny.batch(family, [sample]), **GEN)
            assert final_kept(pruner.stats, "audio")[0] == audios[i]
            assert torch.equal(alone[0, -GEN["max_new_tokens"]:], batch[i, -GEN["max_new_tokens"]:])
    if pruner.stage == "pre-llm":  # round(0.4 n) of each clip
        assert [len(kept) for sample in audios for kept in sample] == [
            round(0.4 * tiny.tokens_per_audio(i, family)) for i in (0, 1, 2)]


def test_interleaved_audio_and_video_keep_their_order_and_tmrope_ids():
    """Pre-LLM pruning of an audio-in-video prompt: the survivors keep their slots (video and audio chunks stay
    interleaved) and the position ids the model computed for the full prompt."""
    model = tiny_model(FAMILY)
    inputs = interleaved()
    seen = []

    def run() -> None:  # the position ids the decoder receives (hooked after mmprune's own hook)
        lm = model.model.language_model
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()

    run()  # the ids the model computes for the whole prompt
    pruner = mmprune.get("random", keep=0.5, keep_audio=0.3)
    with pruner.attach(model):
        run()
    full, pruned = (rows[-3:] if rows.shape[0] == 4 else rows for rows in seen)  # the 3 M-RoPE rows
    ids = inputs["input_ids"][0]
    video = (ids == tiny.VIDEO_TOKEN).nonzero().squeeze(1)
    audio = (ids == tiny.AUDIO_TOKEN).nonzero().squeeze(1)
    text = ((ids != tiny.VIDEO_TOKEN) & (ids != tiny.AUDIO_TOKEN)).nonzero().squeeze(1)
    (kept_video,), (kept_audio,) = final_kept(pruner.stats, "video")[0], final_kept(pruner.stats, "audio")[0]
    assert len(kept_video) == 32 and len(kept_audio) == 30
    order = torch.sort(torch.cat([text, video[kept_video], audio[kept_audio]])).values
    assert int(full[0, 0].max()) > int(full[0, 0, -4])  # TMRoPE: the late chunk's ids run past the text's
    assert torch.equal(pruned[:, 0], full[:, 0, order])
    kinds = ids[order]
    first_audio = int((kinds == tiny.AUDIO_TOKEN).nonzero()[0])
    assert bool((kinds[first_audio:] == tiny.VIDEO_TOKEN).any())  # a video chunk still follows the first audio


def test_audio_stats_give_seconds_and_a_per_modality_layer_count():
    model = tiny_model(FAMILY)
    pruner = mmprune.get("fastv", keep=0.5, keep_audio=0.2)
    with pruner.attach(model), torch.no_grad():
        model(**tiny.batch(FAMILY, [[2, ("img", 0), 3, ("aud", 0), 2]]))
    sample = pruner.stats["samples"][0]
    (audio,) = sample["audios"]
    assert audio["modality"] == "audio" and audio["before"] == 50 and audio["seconds"] == pytest.approx(2.0)
    assert audio["token_seconds"] == pytest.approx(0.04)
    assert audio["segments"] == [[0, 1, 50, False]]
    by_modality = sample["tokens_per_layer_by_modality"]
    assert by_modality["audio"] == [50, 50, 10, 10] and by_modality["image"] == [16, 16, 8, 8]


def test_keep_audio_is_checked_at_get():
    with pytest.raises(ValueError, match=r"fastervlm does not prune audio, so keep_audio does not apply; methods "
                                         r"that do: fastv, pool, random, seats, uniform"):
        mmprune.get("fastervlm", keep_audio=0.5)
    with pytest.raises(ValueError, match=r"keep_audio=0 is out of range"):
        mmprune.get("random", keep_audio=0)
    assert mmprune.get("random", keep=0.5).keep_for("audio") == 0.5  # default: keep
    assert "keep_audio" not in mmprune.registry.parameters(mmprune.METHODS["fastervlm"])


def test_a_method_without_audio_refuses_an_audio_prompt():
    model = tiny_model(FAMILY)
    with pytest.raises(ValueError, match=r"divprune does not prune audio \(it handles image, video\); methods that "
                                         r"do: fastv, pool, random, seats, uniform"):
        with mmprune.get("divprune").attach(model), torch.no_grad():
            model(**tiny.batch(FAMILY, [[2, ("aud", 1), 2]]))


def test_speech_output_is_refused():
    """The full model's generate(return_audio=True) asks the thinker for its prompt hidden states, which the talker
    reads; pruning shortens them."""
    model = tiny_model(FAMILY)
    with pytest.raises(ValueError, match=r"output_hidden_states=True \(speech output"):
        with mmprune.get("random").attach(model):
            model.generate(**tiny.batch(FAMILY, [[2, ("aud", 1), 2]]), output_hidden_states=True,
                           return_dict_in_generate=True, **GEN)


def test_the_full_omni_model_points_to_its_thinker():
    from torch import nn

    full = type("Qwen2_5OmniForConditionalGeneration", (nn.Module,), {})()
    with pytest.raises(ValueError, match=r"attach to its \.thinker"):
        mmprune.get("random").attach(full)


def test_releases_before_the_standard_thinker_layout_are_refused_at_attach():
    if omni_supported():
        pytest.skip("this transformers lays the thinker out as mmprune reads it")
    model = tiny.qwen2_5_omni()
    with pytest.raises(ValueError, match=r"supports the Omni thinkers from transformers 5.21.0"):
        mmprune.get("random").attach(model)


def test_video_grids_take_their_time_from_video_second_per_grid():
    model = tiny_model(FAMILY)
    inputs = tiny.batch(FAMILY, [[3, ("vid", 0), 4]])
    inputs["video_second_per_grid"] = torch.tensor([2.0])
    pruner = mmprune.get("uniform", keep=0.5)
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    assert pruner.stats["samples"][0]["videos"][0]["frame_times"] == [0.0, 2.0]


def test_audio_token_attention_is_the_last_audio_layers_received_attention():
    """Reference: the audio tower's own eager attention weights at its last layer, per attention chunk (100 mel
    frames: 50 positions), mean over queries, then the two positions pooled into each token averaged."""
    import copy

    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as omni

    model = tiny_model(FAMILY)
    inputs = tiny.batch(FAMILY, [[2, ("aud", 0), 3], [1, ("aud", 1), 2]])
    seen = []
    pruner = mmprune.get("random", keep=0.5)
    original = pruner.select

    def spy(tokens, k):
        seen.append(tokens.token_attention)
        return original(tokens, k)

    pruner.select = spy
    with pruner.attach(model), torch.no_grad():
        model(**inputs)
    eager = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    last = eager.model.audio_tower.layers[-1].self_attn
    weights = []
    forward = omni.eager_attention_forward

    def record(module, *args, **kwargs):
        out, w = forward(module, *args, **kwargs)
        if module is last:
            weights.append(w[0].mean(1))  # (heads, positions) per chunk
        return out, w

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(omni, "eager_attention_forward", record)
        eager(**inputs)
    received = torch.cat(weights, dim=1)  # clip 0: 2 chunks of 50 positions; clip 1: one chunk of 50
    for clip, (start, tokens) in enumerate([(0, 50), (100, 25)]):
        expected = received[:, start:start + 2 * tokens].reshape(-1, tokens, 2).mean(-1)
        torch.testing.assert_close(seen[clip], expected, rtol=1e-5, atol=1e-6)
