"""The training script on a tiny configuration: every stage runs, the model saves as a loadable HF LLaVA, packed
training turns are exactly the processor's prompt, and a resumed run records its changed settings."""

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmprune.bench.accuracy import prompts
from mmprune.data import synthetic
from mmprune.zoo import train

TINY = ["--image-size", "32", "--patch-size", "8", "--vision-hidden", "32", "--vision-layers", "1",
        "--vision-heads", "2", "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2",
        "--clip-steps", "2", "--clip-batch", "8", "--align-steps", "2", "--qa-steps", "4", "--batch", "3",
        "--turns", "3", "--clip-extra", "4", "--dev", "7", "--eval-every", "100", "--save-every", "2",
        "--aux-until", "1", "--threads", "1"]


def steps_logged(out, stage):
    return [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if r["stage"] == stage]


def test_every_stage_runs_and_saves_a_loadable_llava(tmp_path, monkeypatch):
    real_caption_ids, contrastive_batches = train.caption_ids, []

    def recording(processor, scenes):
        contrastive_batches.append(len(scenes))
        return real_caption_ids(processor, scenes)

    monkeypatch.setattr(train, "caption_ids", recording)
    train.main(TINY + ["--out", str(tmp_path)])
    # clip stage: 8 images (scenes and twins); qa stage: 3 scenes, their twins and >= 4 images for the loss alone
    assert contrastive_batches[:2] == [8, 8] and len(contrastive_batches) == 2 + 4
    assert all(3 + 4 <= n <= 3 + 3 + 4 + 1 for n in contrastive_batches[2:])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    sample = synthetic.sample(0, 0, size=32)
    inputs = processor(text=prompts(processor, [sample.question]), images=[sample.image], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2
    info = json.loads((tmp_path / "training.json").read_text())
    assert info["recipe"]["hard_negatives"] is True and len(info["phases"]) == 1
    assert steps_logged(tmp_path, "qa")[-1] == 3


def test_resume_continues_from_the_checkpoint_and_records_a_changed_recipe(tmp_path, monkeypatch, capsys):
    real_collate, calls = train.collate, []

    def crash_at_qa_step_3(rows, pad_id):
        calls.append(1)
        if len(calls) == 2 + 3 + 1:  # 2 align steps, then qa steps 0-2, then crash before step 3's forward
            raise KeyboardInterrupt
        return real_collate(rows, pad_id)

    monkeypatch.setattr(train, "collate", crash_at_qa_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--out", str(tmp_path)])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 2
    monkeypatch.setattr(train, "collate", real_collate)
    capsys.readouterr()
    train.main(TINY + ["--out", str(tmp_path), "--resume", "--lr", "5e-4"])
    assert "resumed at stage qa step 2" in capsys.readouterr().out
    phases = json.loads((tmp_path / "training.json").read_text())["phases"]
    assert [p["from"] for p in phases] == ["clip step 0", "qa step 2"]
    assert phases[1]["recipe"]["lr"] == 5e-4


def test_packed_turn_is_the_processors_single_turn_prompt(tmp_path):
    processor = train.llava_processor(synthetic.vocabulary(), 32, 8)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    qa = [("what color is the circle ?", "red"), ("how many objects are there ?", "2")]
    ids, labels, turn, positions = train.encode_turns(processor.tokenizer, qa, 16, image_token)
    prompt = processor(text=prompts(processor, [qa[1][0]]), images=[synthetic.sample(0, 0, size=32).image],
                       return_tensors="pt")["input_ids"][0].tolist()
    second = [i for i, t in enumerate(turn) if t in (0, 2)]
    assert [ids[i] for i in second][:len(prompt)] == prompt
    assert [positions[i] for i in second] == list(range(len(second)))
    answer = processor.tokenizer("2 </s>", add_special_tokens=False)["input_ids"]
    assert [labels[i] for i in second if labels[i] != -100] == answer


def test_contrastive_loss_from_encoded_images_is_clipmodels_loss():
    torch.manual_seed(0)
    tiny = argparse.Namespace(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                              hidden=32, intermediate=64, layers=1, heads=2)
    processor, config = train.build(tiny)
    clip = train.clip_model(processor, config).eval()
    pix, ids, mask = train.clip_batch(np.random.default_rng(0), processor, 32, 6, hard_negatives=True)
    pooled = clip.vision_model(pixel_values=pix).pooler_output
    expected = clip(input_ids=ids, attention_mask=mask, pixel_values=pix, return_loss=True).loss
    torch.testing.assert_close(train.contrastive_loss(clip, pooled, ids, mask), expected)


def test_a_finished_run_trains_on_when_resumed_with_more_qa_steps(tmp_path):
    train.main(TINY + ["--out", str(tmp_path)])
    train.main(TINY + ["--out", str(tmp_path), "--resume", "--qa-steps", "6"])
    assert steps_logged(tmp_path, "qa")[-1] == 5
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 6
    phases = json.loads((tmp_path / "training.json").read_text())["phases"]
    assert [p["from"] for p in phases] == ["clip step 0", "qa step 4"]


def test_jittered_layout_keeps_raster_order_and_the_text_follows_it():
    rng = np.random.default_rng(0)
    layouts = [train.jittered_layout(rng, 144) for _ in range(200)]
    assert all(len(lay) == 144 and lay == sorted(lay) and lay[0] >= 0 for lay in layouts)
    spans = [lay[-1] + 1 for lay in layouts]
    assert 16 <= min(spans) <= 30 and 144 < max(spans) <= 162
    tokenizer = train.llava_processor(synthetic.vocabulary(), 32, 8).tokenizer
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    qa = [("what color is the circle ?", "red")]
    _, _, turn, default = train.encode_turns(tokenizer, qa, 16, image_token)
    layout = [0, 0, 1, 3, 3, 3, 4, 6, 7, 7, 8, 9, 9, 9, 10, 12]
    ids, _, _, positions = train.encode_turns(tokenizer, qa, 16, image_token, layout)
    image = [i for i, t in enumerate(ids) if t == image_token]
    start = default[image[0]]
    assert [default[i] for i in image] == list(range(start, start + 16))
    assert [positions[i] for i in image] == [start + p for p in layout]
    text = [i for i, t in enumerate(turn) if t == 1]
    assert [positions[i] for i in text] == list(range(start + 13, start + 13 + len(text)))
    assert [default[i] for i in text] == list(range(start + 16, start + 16 + len(text)))


def test_family_weights_shift_the_training_questions_and_bad_weights_are_refused(capsys):
    def share_of_exist(weights):
        rng = np.random.default_rng(0)
        asked = [q for _ in range(150) for q, _ in train.training_turns(rng, 32, 4, 0.0, weights)[1]]
        return sum(q.startswith("is there") for q in asked) / len(asked)

    uniform = share_of_exist(None)
    weights = [6.0 if f == "exist" else 1.0 for f in synthetic.FAMILIES]
    assert share_of_exist([w / sum(weights) for w in weights]) > 2 * uniform
    assert train.family_weights_arg("exist=2,count=1.5") == {"exist": 2.0, "count": 1.5}
    for bad, message in (("colour=2", "unknown family 'colour'"), ("exist=x", "must be a number"),
                         ("exist=0", "must be > 0")):
        with pytest.raises(SystemExit):
            train.main(["--out", "unused", "--family-weights", bad])
        assert message in capsys.readouterr().err


def test_aux_targets_pick_the_auxiliary_heads_and_unknown_targets_are_refused(tmp_path, capsys):
    assert train.aux_targets_arg("column,row") == ["row", "column"]  # patch_targets' column order
    at = TINY.index("--aux-until")
    args = TINY[:at] + ["--aux-until", "4"] + TINY[at + 2:] + ["--out", str(tmp_path)]  # aux on to the end
    train.main(args + ["--aux-targets", "row,column"])
    aux = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["aux"]
    assert aux["targets"] == ["row", "column"]
    grid = 32 // 8
    assert [aux["heads"][f"{i}.weight"].shape[0] for i in range(2)] == [grid, grid] and "2.weight" not in aux["heads"]
    with pytest.raises(SystemExit):
        train.main(args + ["--aux-targets", "row,depth"])
    assert "unknown auxiliary target(s) 'depth'; allowed: colour, shape, size, row, column" in capsys.readouterr().err


def test_stop_at_ends_the_qa_stage_early_on_the_longer_schedule(tmp_path, monkeypatch, capsys):
    schedules = []
    real_lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, steps, *rest: schedules.append(steps) or real_lr_at(
        step, steps, *rest))
    train.main(TINY + ["--out", str(tmp_path), "--qa-steps", "6", "--stop-at", "3"])
    assert steps_logged(tmp_path, "qa")[-1] == 2 and schedules[-3:] == [6, 6, 6]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    assert json.loads((tmp_path / "training.json").read_text())["recipe"]["stop_at"] == 3
    LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        train.main(["--out", "unused", "--qa-steps", "6", "--stop-at", "7"])
    assert "--stop-at 7: must be a qa step in 1..--qa-steps (6)" in capsys.readouterr().err


def test_position_shuffle_puts_image_positions_out_of_order_and_the_text_after_the_largest(tmp_path, monkeypatch,
                                                                                          capsys):
    layouts, real_encode = [], train.encode_turns

    def recording(tokenizer, qa, image_tokens, image_token_id, image_positions=None):
        out = real_encode(tokenizer, qa, image_tokens, image_token_id, image_positions)
        layouts.append((image_positions, out[3], out[2]))
        return out

    monkeypatch.setattr(train, "encode_turns", recording)
    train.main(TINY + ["--out", str(tmp_path), "--position-jitter", "1", "--position-shuffle", "1"])
    shuffled = [lay for lay, _, _ in layouts if lay is not None]
    assert len(shuffled) == 3 * (2 + 4)  # every row of batch 3 over 2 align and 4 qa steps
    assert sum(lay != sorted(lay) for lay in shuffled) >= 16  # 16 positions in random order
    for layout, positions, turn in layouts:
        if layout is not None:  # the prefix ends with the image tokens; each turn starts right after the largest
            prefix = [p for p, t in zip(positions, turn) if t == 0]
            assert prefix[-16:] == [prefix[-17] + 1 + q for q in layout]
            assert min(p for p, t in zip(positions, turn) if t == 1) == max(prefix) + 1
    assert json.loads((tmp_path / "training.json").read_text())["recipe"]["position_shuffle"] == 1.0
    for flag in ("--position-shuffle", "--position-jitter"):
        with pytest.raises(SystemExit):
            train.main(["--out", "unused", flag, "1.5"])
        assert f"{flag} 1.5: must be a share of rows in 0..1" in capsys.readouterr().err
