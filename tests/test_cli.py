"""`mmprune methods` and `mmprune run` on a tiny random LLaVA saved with a real processor."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import mmprune
from conftest import averages_over_layers
from mmprune.cli import main
from mmprune.zoo.tiny_random import build_tiny_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", image_size=32, patch_size=8))


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return str(path)


def run(*argv):
    return main(list(argv))


def test_methods_lists_every_method_with_stage(capsys):
    assert run("methods") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["method", "stage", "description"]
    assert [line.split()[0] for line in out[1:]] == mmprune.available()
    assert [line.split()[1] for line in out[1:]] == [mmprune.METHODS[m].stage for m in mmprune.available()]


@pytest.mark.parametrize("method", [m for m in mmprune.available() if m != "none"])
def test_run_json_reports_tokens(method, model_dir, image_file, capsys):
    multi_stage = averages_over_layers(method)
    keep = 8 if multi_stage else 4  # multi-stage: the average over layers; every token runs until stage 1
    assert run("run", "--model", model_dir, "--method", method, "--keep", str(keep), "--image", image_file,
               "--prompt", "what is the colour ?", "--max-new-tokens", "3", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == method and result["keep"] == keep
    assert result["visual_tokens_before"] == 16 and len(result["tokens_per_layer"]) == 4
    assert result["visual_tokens_after"] == result["tokens_per_layer"][-1] >= len(result["kept"][0])
    if multi_stage:
        per_layer = result["tokens_per_layer"]
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[-1] < 16
        if mmprune.METHODS[method].keep_means.startswith("equivalent average"):
            assert result["equivalent_tokens"] <= keep + 0.5
    elif mmprune.METHODS[method].stage == "pre-llm":
        assert result["tokens_per_layer"] == [4] * 4 and result["equivalent_tokens"] == 4.0
    elif mmprune.METHODS[method].stage == "pre+in-llm":
        # the pre-LLM budget the method derives from keep; its in-LLM stages remove more
        assert result["tokens_per_layer"][0] == mmprune.get(method, keep=keep).pre_llm_budget(16)
    else:
        assert result["tokens_per_layer"][-1] == 4 and result["tokens_per_layer"][0] == 16
    assert isinstance(result["answer"], str)


def test_run_plain_prints_answer_and_tokens(model_dir, image_file, capsys):
    assert run("run", "--model", model_dir, "--method", "fastervlm", "--keep", "0.5", "--image", image_file,
               "--prompt", "what ?", "--max-new-tokens", "2") == 0
    assert "visual tokens 16 -> 8" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (("--method", "nope", "--keep", "4"), "unknown method 'nope'"),
    (("--method", "random", "--keep", "0"), "keep=0 is out of range"),
    (("--method", "random", "--keep", "1.5"), "keep=1.5 is out of range"),
    (("--method", "random", "--keep", "many"), "--keep 'many' is not a number"),
    (("--method", "random", "--keep", "17"), "keep=17 asks for more tokens than the image has (16"),
])
def test_bad_input_exits_nonzero_with_one_line(args, message, model_dir, image_file, capsys):
    assert run("run", "--model", model_dir, "--image", image_file, "--prompt", "q", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmprune: error:") and message in err[0]


def test_missing_image_file(model_dir, capsys):
    assert run("run", "--model", model_dir, "--method", "random", "--keep", "4", "--image", "/no/such.png",
               "--prompt", "q") == 2
    assert "no such file" in capsys.readouterr().err


def test_missing_model(image_file, tmp_path, capsys):
    assert run("run", "--model", str(tmp_path / "absent"), "--method", "random", "--keep", "4", "--image",
               image_file, "--prompt", "q") == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_demo_runs_offline_on_the_shipped_model(tmp_path, capsys):
    from mmprune import demo

    demo.main(["--out", str(tmp_path), "--questions", "14"])
    out = capsys.readouterr().out
    table = out[out.index("method "):].splitlines()[1:1 + 1 + len(demo.METHODS)]
    assert [row.split()[0] for row in table] == ["none", *demo.METHODS]
    assert [row.split()[1] for row in table] == ["144"] + ["16"] * len(demo.METHODS)
    assert sorted(p.name for p in tmp_path.glob("kept_*.png")) == [f"kept_{m}.png" for m in sorted(demo.METHODS)]
