"""The shipped model: stock HF LLaVA loaded offline, answers held-out questions, processor round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

import mmprune
from mmprune.bench.accuracy import evaluate, prompts
from mmprune.cli import main
from mmprune.data import synthetic
from mmprune.zoo import SHIPPED_MODEL, load_shipped
from mmprune.zoo.train import encode_turns, pixels


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def held_out():
    return synthetic.generate(50, seed=0)  # the first 50 questions of the reported 1000-question benchmark


def test_shipped_files_are_small_safetensors_in_the_package():
    weights = SHIPPED_MODEL / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 30 * 2**20
    assert not list(SHIPPED_MODEL.glob("*.bin")) and not (SHIPPED_MODEL / "checkpoint.pt").exists()


def test_loads_offline_through_auto_classes_as_llava_with_144_tokens():
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED_MODEL)
    assert type(model) is LlavaForConditionalGeneration
    vision = model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 >= 144
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"


def test_answers_fifty_held_out_questions(shipped, held_out):
    model, processor = shipped
    result = evaluate(model, processor, held_out)
    assert result["accuracy"] >= 0.9, result


def test_processor_round_trips(shipped, held_out, tmp_path):
    _, processor = shipped
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    text = prompts(processor, [s.question for s in held_out[:4]])
    images = [s.image for s in held_out[:4]]
    a = processor(text=text, images=images, padding=True, return_tensors="pt")
    b = again(text=text, images=images, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert (a["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(1).tolist() == [144] * 4
    for s in held_out[:10]:
        ids = processor.tokenizer(s.question, add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(ids) == s.question
        assert processor.tokenizer.unk_token_id not in ids


def test_training_encoding_is_the_processors(shipped, held_out):
    model, processor = shipped
    for s in held_out[:5]:
        inputs = processor(text=prompts(processor, [s.question]), images=[s.image], return_tensors="pt")
        ids, labels, _, _ = encode_turns(processor.tokenizer, [(s.question, s.answers[0])], 144,
                                         model.config.image_token_id)
        n = inputs["input_ids"].shape[1]
        assert ids[:n] == inputs["input_ids"][0].tolist()
        assert processor.tokenizer.decode([t for t in labels if t != -100]) == f"{s.answers[0]} </s>"
        assert torch.allclose(pixels([s.image], processor.image_processor), inputs["pixel_values"])


def test_cli_run_defaults_to_the_shipped_model(held_out, tmp_path, capsys):
    sample = next(s for s in held_out if s.family == "attribute")
    image = tmp_path / "scene.png"
    sample.image.save(image)
    assert main(["run", "--method", "fastervlm", "--keep", "0.25", "--image", str(image), "--prompt",
                 sample.question, "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens_before"] == 144 and result["visual_tokens_after"] == 36
    assert result["answer"] in sample.answers


def test_pruned_model_still_answers_with_the_full_budget(shipped, held_out):
    model, processor = shipped
    full = evaluate(model, processor, held_out[:14])
    kept_all = evaluate(model, processor, held_out[:14], pruner=mmprune.get("fastervlm", keep=1.0))
    assert kept_all["answers"] == full["answers"]


def test_report_measures_every_property_it_prints(tmp_path, capsys):
    from mmprune.zoo import report

    report.main(["--n", "21", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "report.json").read_text())
    assert set(written["accuracy"]) == {"overall", *synthetic.FAMILIES} == set(written["noise_image"])
    assert set(written["chance"]) == set(synthetic.FAMILIES)
    assert written["cls_top25"]["objects_covered"] > written["random_25"]["objects_covered"]
    assert set(written["pruned_11pct"]) == {"keep", "random", "pool", "fastervlm", "visionzip", "divprune",
                                            "fastervlm, original positions"}
    assert written["pruned_11pct"]["keep"] == 16
    printed = capsys.readouterr().out
    assert "| fastervlm, original positions @ 16 tokens (%) |" in printed and "[CLS] attention" in printed
