"""mmprune's pre-LLM methods inside vLLM (mmprune.integrations.vllm) on the shipped model, against mmprune +
transformers in the same process. Runs in .venv-vllm (`make test-vllm`, CPU build of vLLM); skips elsewhere."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import urllib.request

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not importable here: `make vllm` builds .venv-vllm with it, `make test-vllm` runs this file "
                "there", allow_module_level=True)

# one in-process engine at a time (no engine-core process: spawning one per engine costs seconds each); a small KV
# cache (GiB); never reach the hub
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(ENGINE_ENV)

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import mmprune  # noqa: E402
from mmprune.bench.accuracy import prompts as chat_prompts  # noqa: E402
from mmprune.bench import serving  # noqa: E402
from mmprune.data import synthetic  # noqa: E402
from mmprune.integrations import vllm as plugin  # noqa: E402
from mmprune.integrations.vllm.llava import image_segments  # noqa: E402
from mmprune.zoo import SHIPPED_MODEL, load_shipped  # noqa: E402

N_QUESTIONS = 8
MAX_TOKENS = 4
GRID = 12  # the shipped model's 96-px images: 12 x 12 patches
ENGINE = dict(model=str(SHIPPED_MODEL), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1}, block_size=32)  # the CPU attention needs blocks of 32
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
# the methods the issue names, at 16 of 144 tokens
METHODS = ["random", "uniform", "pool", "fastervlm", "visionzip", "divprune"]


@pytest.fixture(scope="module")
def questions():
    return synthetic.generate(N_QUESTIONS, seed=0)


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def prompts(shipped, questions):
    _, processor = shipped
    return chat_prompts(processor, [q.question for q in questions])


def transformers_run(shipped, questions, prompts, method: str, **params) -> dict:
    """mmprune + transformers, one question at a time, greedy: new token ids, kept indices, text tokens."""
    model, processor = shipped
    image_token = model.config.image_token_id
    out = {"tokens": [], "kept": [], "text_tokens": []}
    pruner = mmprune.get(method, **params)
    for question, prompt in zip(questions, prompts):
        inputs = processor(text=[prompt], images=[question.image], return_tensors="pt")
        with pruner.attach(model), torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        out["tokens"].append(ids[0, inputs["input_ids"].shape[1]:].tolist())
        out["kept"].append(pruner.stats["samples"][0]["images"][0]["kept"])
        out["text_tokens"].append(int((inputs["input_ids"][0] != image_token).sum()))
    return out


def requests(prompts, questions) -> list[dict]:
    return [{"prompt": p, "multi_modal_data": {"image": q.image}} for p, q in zip(prompts, questions)]


def vllm_run(prompts, questions, method: str, engine: dict | None = None, passes: int = 1, **params) -> dict:
    """The plugin in a fresh engine (every image's kept indices logged): per pass, the new token ids, prompt
    lengths and cached prompt tokens of each request; and the kept indices of the first pass."""
    llm = LLM(**ENGINE, **(engine or {}), **plugin.engine_kwargs(method, log=64, **params))
    try:
        runs = []
        for _ in range(passes):
            outputs = llm.generate(requests(prompts, questions), GREEDY, use_tqdm=False)
            runs.append({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                         "prompt_len": [len(o.prompt_token_ids) for o in outputs],
                         "cached": [o.num_cached_tokens or 0 for o in outputs]})
        log = llm.apply_model(plugin.kept_log)[0]
    finally:
        del llm
        gc.collect()
    return {"runs": runs, "kept": [entry["kept"] for entry in log[:len(prompts)]], "log": log}


def count(method: str, **params) -> int:
    return mmprune.get(method, **params).output_count(GRID * GRID, image_segments(GRID, with_cls=False))


@pytest.mark.parametrize("method", METHODS)
def test_equal_to_transformers(method, shipped, questions, prompts):
    reference = transformers_run(shipped, questions, prompts, method, keep=16)
    served = vllm_run(prompts, questions, method, keep=16)
    run = served["runs"][0]
    assert run["tokens"] == reference["tokens"]
    assert served["kept"] == reference["kept"]
    assert count(method, keep=16) == 16
    assert run["prompt_len"] == [t + 16 for t in reference["text_tokens"]]


def test_none_equals_unpruned_transformers(shipped, questions, prompts):
    reference = transformers_run(shipped, questions, prompts, "none")
    served = vllm_run(prompts, questions, "none")
    assert served["runs"][0]["tokens"] == reference["tokens"]
    assert served["runs"][0]["prompt_len"] == [t + GRID * GRID for t in reference["text_tokens"]]
    assert all(entry["kept"] == list(range(GRID * GRID)) for entry in served["log"])


def test_pool_reserves_its_lattice_not_its_budget(shipped, questions, prompts):
    """keep=17 pools 12x12 to 4x4: 16 placeholders, and the same answers as transformers."""
    reference = transformers_run(shipped, questions[:4], prompts[:4], "pool", keep=17)
    served = vllm_run(prompts[:4], questions[:4], "pool", keep=17)
    assert count("pool", keep=17) == 16
    assert served["runs"][0]["prompt_len"] == [t + 16 for t in reference["text_tokens"]]
    assert served["runs"][0]["tokens"] == reference["tokens"]


def test_scheduling_does_not_change_outputs(shipped, questions, prompts):
    """Chunked prefill in 8-token steps (every 48-token image span is split), a second pass served from the prefix
    cache (a full 32-token block per prompt), and the same image three times in one batch (one encoder-cache
    entry): every answer equals mmprune + transformers."""
    reference = transformers_run(shipped, questions, prompts, "fastervlm", keep=48)
    engine = dict(enable_chunked_prefill=True, max_num_batched_tokens=8, enable_prefix_caching=True)
    llm = LLM(**ENGINE, **engine, **plugin.engine_kwargs("fastervlm", keep=48))
    try:
        llm.apply_model(record_steps)
        first = llm.generate(requests(prompts, questions), GREEDY, use_tqdm=False)
        steps = llm.apply_model(recorded_steps)[0]
        second = llm.generate(requests(prompts, questions), GREEDY, use_tqdm=False)
        thrice = llm.generate(requests([prompts[0]] * 3, [questions[0]] * 3), GREEDY, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    assert [list(o.outputs[0].token_ids) for o in first] == reference["tokens"]
    assert [list(o.outputs[0].token_ids) for o in second] == reference["tokens"]
    assert all((o.num_cached_tokens or 0) >= 32 for o in second), [o.num_cached_tokens for o in second]
    assert [list(o.outputs[0].token_ids) for o in thrice] == [reference["tokens"][0]] * 3
    assert [len(o.prompt_token_ids) for o in first] == [t + 48 for t in reference["text_tokens"]]
    assert max(steps) <= 8 and sum(steps) >= sum(len(o.prompt_token_ids) for o in first)  # prefill went in chunks


def record_steps(model) -> None:
    """(for ``llm.apply_model``) count the tokens of every decoder forward from now on."""
    model.mmprune_test_steps = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: module.mmprune_test_steps.append(int(kwargs["positions"].shape[-1])
                                                                      if "positions" in kwargs
                                                                      else int(args[1].shape[-1])),
        with_kwargs=True)


def recorded_steps(model) -> list[int]:
    return list(model.mmprune_test_steps)


def test_an_engine_built_without_engine_kwargs_refuses_what_it_cannot_serve():
    """hf_overrides written by hand reach the same checks when the engine builds the model."""
    overrides = {"architectures": [plugin.ARCH], plugin.CONFIG_KEY: {"method": "fastv", "params": {"keep": 16}}}
    with pytest.raises(Exception) as error:
        LLM(**ENGINE, hf_overrides=overrides)
    gc.collect()
    assert "vLLM cannot serve fastv: it removes tokens between decoder layers" in "".join(
        str(e) for e in walk(error.value))


def walk(error: BaseException):
    """An exception and its causes (vLLM may wrap the model's error)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_the_tested_version_is_installed_and_registered():
    import vllm
    from vllm import ModelRegistry

    assert plugin.check_vllm_version()
    assert vllm.__version__.split("+")[0] == plugin.TESTED_VLLM
    plugin.register()
    plugin.register()  # vLLM calls it in every process, maybe more than once
    assert plugin.ARCH in ModelRegistry.get_supported_archs()


def post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_openai_server_answers_as_offline(shipped, questions, prompts, tmp_path):
    """vLLM's OpenAI-compatible server on 127.0.0.1 with --hf-overrides: a chat completion with a base64 PNG reports
    text + 16 prompt tokens and the offline answer. (``vllm serve`` fails in the vllm-cpu distribution: it asks for
    the metadata of a package named vllm; the module entry point is the same server.)"""
    _, processor = shipped
    reference = transformers_run(shipped, questions[:1], prompts[:1], "fastervlm", keep=16)
    port = serving.free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(SHIPPED_MODEL),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
               "--enforce-eager", "--block-size", "32", "--limit-mm-per-prompt", json.dumps({"image": 1}),
               *plugin.server_args("fastervlm", keep=16)]
    # the server runs its engine in its own process; stopped by its process id (SIGTERM, then SIGKILL to its group)
    with serving.running_server(command, tmp_path / "server.log", port, startup_s=240,
                                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}):
        reply = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": str(SHIPPED_MODEL), "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": serving.image_url(questions[0].image)}},
                {"type": "text", "text": questions[0].question}]}]},
            timeout=120)
    expected = processor.tokenizer.decode(reference["tokens"][0], skip_special_tokens=True)
    assert reply["usage"]["prompt_tokens"] == reference["text_tokens"][0] + 16
    assert reply["choices"][0]["message"]["content"].strip() == expected.strip()


OTHERS = [m for m in plugin.servable_methods() if m not in METHODS and m != "none"]


@pytest.mark.parametrize("method", OTHERS)
def test_every_other_servable_method_equals_transformers(method, shipped, questions, prompts):
    """The methods the issue does not name, on two questions each (an engine each is the cost)."""
    reference = transformers_run(shipped, questions[:2], prompts[:2], method, keep=16)
    served = vllm_run(prompts[:2], questions[:2], method, keep=16)
    assert served["runs"][0]["tokens"] == reference["tokens"]
    assert served["kept"] == reference["kept"]
    assert served["runs"][0]["prompt_len"] == [t + count(method, keep=16) for t in reference["text_tokens"]]
