"""`mmprune methods` and `mmprune run` on a tiny random LLaVA saved with a real processor."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import mmprune
from conftest import adaptive_count, averages_over_layers, pruning
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


@pytest.mark.parametrize("method", pruning("image"))
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
    elif adaptive_count(method):  # keep is the most the image keeps
        after = result["visual_tokens_after"]
        assert 1 <= after <= 4 and result["tokens_per_layer"] == [after] * 4
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


@pytest.mark.parametrize("kind", ["absent", "file"])
def test_missing_model_folder_says_what_is_wrong(kind, image_file, tmp_path, capsys):
    target = tmp_path / "absent"
    if kind == "file":
        target = tmp_path / "model.bin"
        target.write_bytes(b"")
    assert run("run", "--model", str(target), "--method", "random", "--keep", "4", "--image", image_file,
               "--prompt", "q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("no such folder" if kind == "absent" else "is a file: expected a model folder") in err[0]


def test_a_directory_as_image(model_dir, tmp_path, capsys):
    assert run("run", "--model", model_dir, "--method", "random", "--keep", "4", "--image", str(tmp_path),
               "--prompt", "q") == 2
    assert "is a directory: expected an image file" in capsys.readouterr().err


def test_params_dtype_attention_and_several_images_are_honoured(model_dir, image_file, tmp_path, capsys):
    kept = tmp_path / "kept.png"
    assert run("run", "--model", model_dir, "--method", "pyramiddrop", "--keep", "0.75", "--param", "layers=[1,2]",
               "--param", "lam=0.5", "--image", image_file, "--image", image_file, "--prompt", "q",
               "--max-new-tokens", "2", "--dtype", "bfloat16", "--attn-implementation", "eager", "--device", "cpu",
               "--save-kept", str(kept), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["attn_implementation"] == "eager" and result["device"] == "cpu"
    assert result["visual_tokens_before"] == 32 and len(result["kept"]) == 2
    assert result["tokens_per_layer"] == [32, 16, 8, 8]  # lam 0.5 at layers 1 and 2, per image
    assert result["saved"] == [str(tmp_path / "kept_0.png"), str(tmp_path / "kept_1.png")]
    assert all(Image.open(p).size[0] == 40 for p in result["saved"])


def test_dtype_defaults_to_float32_on_cpu(model_dir, image_file, capsys):
    assert run("run", "--model", model_dir, "--method", "random", "--keep", "4", "--image", image_file,
               "--prompt", "q", "--max-new-tokens", "1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float32"


def test_json_counts_merged_tokens_beside_kept(model_dir, image_file, capsys):
    assert run("run", "--model", model_dir, "--method", "visionzip", "--keep", "8", "--image", image_file,
               "--prompt", "q", "--max-new-tokens", "1", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    # 8 outputs: [CLS] and one contextual token carry new content (round(8 * 10 / 64) = 1); the contextual token
    # occupies its target's slot and [CLS] shares the first dominant patch's, so 7 distinct slots are kept
    assert result["merged"] == [2] and result["visual_tokens_after"] == 8 and len(result["kept"][0]) == 7


@pytest.mark.parametrize(("args", "message"), [
    (("--param", "layers"), "--param 'layers': expected NAME=VALUE"),
    (("--param", "lam=2.0"), "pyramiddrop: lam=2.0 is not valid: expected None or a number in (0, 1]"),
    (("--param", "lamda=0.5"), "unknown parameter 'lamda' (did you mean 'lam'?)"),
    (("--param", "layers=[1,9]"), "layers=[1, 9] is beyond the model: layer 9 is not inside its 4-layer"),
    (("--device", "cuda"), "no CUDA device is available"),
    (("--device", "toaster"), "--device 'toaster' is not a torch device"),
])
def test_bad_run_options_exit_2_with_one_line(args, message, model_dir, image_file, capsys):
    if args[:2] == ("--device", "cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run("run", "--model", model_dir, "--method", "pyramiddrop", "--keep", "0.75", "--image", image_file,
               "--prompt", "q", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_methods_name_lists_hyper_parameters(capsys):
    assert run("methods", "PyramidDrop") == 0
    out = capsys.readouterr().out
    assert out.startswith("pyramiddrop (in-llm)")
    assert "keep means: equivalent average visual tokens per layer (default 0.4688)" in out
    assert "lam = None: lambda, the share kept at each stage" in out and "allowed: None or a number in (0, 1]" in out
    assert "layers = None" in out and "paper: \"PyramidDrop" in out
    assert run("methods", "pyramid") == 2
    assert "did you mean 'pyramiddrop'" in capsys.readouterr().err


def test_methods_verbose_lists_every_method_with_its_parameters(capsys):
    assert run("methods", "--verbose") == 0
    out = capsys.readouterr().out
    for name, cls in mmprune.METHODS.items():
        assert f"keep means: {cls.keep_means}" in out
    assert "  seed = 0: base seed of the draw; allowed: an int >= 0" in out


def test_demo_runs_offline_on_the_shipped_model(tmp_path, capsys):
    from mmprune import demo

    demo.main(["--out", str(tmp_path), "--questions", "14"])
    out = capsys.readouterr().out
    table = out[out.index("method "):].splitlines()[1:1 + 1 + len(demo.METHODS)]
    assert [row.split()[0] for row in table] == ["none", *demo.METHODS]
    assert [row.split()[1] for row in table] == ["144"] + ["16"] * len(demo.METHODS)
    assert sorted(p.name for p in tmp_path.glob("kept_*.png")) == [f"kept_{m}.png" for m in sorted(demo.METHODS)]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from mmprune.zoo.tiny_random import build_tiny_qwen2_vl

    return str(build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny") / "qwen2_vl"))


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    from mmprune.zoo.tiny_random import build_tiny_llava_onevision

    return str(build_tiny_llava_onevision(tmp_path_factory.mktemp("tiny") / "llava_onevision"))


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for t in range(4):  # a white square moving right over 4 frames of 32 x 32
        frame = Image.new("RGB", (32, 32), (0, 0, 0))
        frame.paste((255, 255, 255), (4 + 6 * t, 10, 14 + 6 * t, 20))
        frame.save(folder / f"frame_{t:02d}.png")
    return str(folder)


def test_run_prunes_a_video_from_a_folder_of_frames(qwen_dir, frames_dir, image_file, capsys):
    assert run("run", "--model", qwen_dir, "--method", "evs", "--keep", "0.75", "--video", frames_dir,
               "--image", image_file, "--fps", "4", "--prompt", "what is the shape ?", "--max-new-tokens", "2",
               "--json") == 0
    result = json.loads(capsys.readouterr().out)
    video = result["videos"][0]
    # 4 frames of 32 px, patch 4, 2 frames per grid, 2x2 merge: 2 grids of 4 x 4 = 32 tokens; EVS keeps 24
    assert video["frames"] == [2, 4, 4] and video["before"] == 32 and video["after"] == 24
    assert video["kept_per_frame"][0] == 16 and video["frame_times"] == [None, None]  # Qwen2-VL: no time
    assert result["visual_tokens_before"] > video["before"] and len(result["kept"]) == 1  # the image counts too
    assert run("run", "--model", qwen_dir, "--method", "evs", "--keep", "0.75", "--video", frames_dir,
               "--prompt", "what ?", "--max-new-tokens", "1") == 0
    assert "video: 32 -> 24 tokens over 2 temporal grids (kept per grid [16, 8])" in capsys.readouterr().out


def test_run_prunes_a_llava_onevision_video(onevision_dir, frames_dir, capsys):
    """4 frames of 32 px, SigLIP patch 8: 4 x 4 patches pooled to 2 x 2 per frame, and the trailing newline."""
    assert run("run", "--model", onevision_dir, "--method", "evs", "--keep", "0.5", "--video", frames_dir,
               "--prompt", "what is the shape ?", "--max-new-tokens", "2", "--json") == 0
    video = json.loads(capsys.readouterr().out)["videos"][0]
    assert video["frames"] == [4, 2, 2] and video["before"] == 17 and video["after"] == 8
    assert video["kept_per_frame"][0] == 4 and 16 in video["kept"]  # the first frame and the newline stay


def test_run_decodes_a_video_file_with_pyav(qwen_dir, frames_dir, tmp_path, capsys):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for name in sorted(__import__("os").listdir(frames_dir)):
            frame = av.VideoFrame.from_image(Image.open(f"{frames_dir}/{name}"))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert run("run", "--model", qwen_dir, "--method", "uniform", "--keep", "8", "--video", str(path), "--fps", "4",
               "--prompt", "what ?", "--max-new-tokens", "1", "--json") == 0
    video = json.loads(capsys.readouterr().out)["videos"][0]
    assert video["frames"] == [2, 4, 4] and video["after"] == 8 and video["kept_per_frame"] == [4, 4]


@pytest.mark.parametrize(("args", "message"), [
    (("--video", "/no/such/clip.mp4"), "--video: '/no/such/clip.mp4': no such video file or folder of frames"),
    (("--method", "fastervlm", "--video", "FRAMES"), "fastervlm does not prune video"),
    (("--video", "FRAMES", "--fps", "0"), "fps=0.0: expected a positive number"),
    (("--model", "LLAVA", "--video", "FRAMES"), "--video: video prompts are built for Qwen2-VL/Qwen2.5-VL and "
                                                "LLaVA-OneVision/LLaVA-NeXT-Video models"),
    (("--model", "ONEVISION", "--video", "FRAMES", "--image", "IMAGE"), "video prompts are built with one video and no image per prompt"),
    (("--model", "ONEVISION", "--image", "IMAGE"), "could not be built (it needs torchvision)"),
    ((), "give at least one --image or a --video"),
])
def test_bad_video_options_exit_2_with_one_line(args, message, qwen_dir, frames_dir, model_dir, onevision_dir,
                                                image_file, capsys):
    names = {"FRAMES": frames_dir, "LLAVA": model_dir, "ONEVISION": onevision_dir, "IMAGE": image_file}
    args = tuple(names.get(a, a) for a in args)
    base = {"--model": qwen_dir, "--method": "evs"}
    for i in range(0, len(args) - 1):
        if args[i] in base:
            base[args[i]] = args[i + 1]
    rest = [a for i, a in enumerate(args) if a not in base and (i == 0 or args[i - 1] not in base)]
    argv = ["run", "--model", base["--model"], "--method", base["--method"], "--keep", "0.5", "--prompt", "q", *rest]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_methods_shows_the_whole_paper_paragraph(capsys):
    from mmprune.cli import paper_citation

    assert paper_citation(["Keep tokens.", "", "Paper: 'A Title' (CVPR", "2025); code x/y.", "", "Rule: ..."]) == (
        "'A Title' (CVPR 2025); code x/y.")
    assert paper_citation(["no citation here"]) == ""
    assert main(["methods", "prumerge"]) == 0
    assert "42Shawn/LLaVA-PruMerge" in capsys.readouterr().out.splitlines()[1]
