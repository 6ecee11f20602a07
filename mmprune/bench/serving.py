"""``mmprune bench --serving``: requests per second and time to first token of vLLM's OpenAI-compatible server, with
and without pruning, at several budgets and concurrency levels, side by side in one run.

Each configuration (``none``, then every method x budget) is one server
(``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, with the plugin's ``--hf-overrides``; ``none`` is the
unpruned model through the same plugin, so the only difference is the method). After two untimed warm-up requests,
each concurrency level sends its own distinct synthetic images (no encoder- or prefix-cache hit across requests),
``concurrency`` requests in flight at a time, each a streamed chat completion with one base64 PNG, exactly
``max_tokens`` new tokens (``ignore_eos``; sampling restricted to the tokenizer's words, so every token streams as
text). Time to first token is measured at the first streamed text; requests per second is requests / wall time of the
level. The server is stopped by its process id.

Models: a folder in the HF layout (default: the shipped model), or ``geometry:NAME`` for a LLaVA geometry of
:mod:`mmprune.bench.speed` (``geometry:small``: CLIP ViT-B/16-384 + a 0.45B decoder, 576 visual tokens), built with
random weights (seed 0) and saved to a temporary folder with the shipped model's tokenizer and a processor resized
to the geometry's image (its answers are meaningless; its timings are what a model of that size costs).

Runs where vLLM is installed (``make vllm``; ``.venv-vllm/bin/python -m mmprune bench --serving ...``).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mmprune.integrations import vllm as plugin

SERVED_NAME = "mmprune-bench"
WARMUP = 2
STARTUP_S = 600  # a server that is not healthy by then failed


def check_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vLLM is not installed in this environment: `make vllm` builds .venv-vllm; run "
                           "`.venv-vllm/bin/python -m mmprune bench --serving ...` there")


@contextmanager
def servable_model(spec: str):
    """The folder to serve: ``spec`` itself, or for ``geometry:NAME`` a temporary random-weight model (removed on
    exit)."""
    if not spec.startswith("geometry:"):
        if not (Path(spec) / "config.json").is_file():
            raise ValueError(f"--model {spec!r}: expected a model folder (config.json, weights, tokenizer, processor) "
                             "or geometry:NAME")
        yield Path(spec)
        return
    folder = Path(tempfile.mkdtemp(prefix="mmprune-serving-"))
    try:
        save_geometry(spec.split(":", 1)[1], folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_geometry(name: str, folder: Path) -> None:
    """A LLaVA geometry of :data:`mmprune.bench.speed.GEOMETRIES` with random weights (seed 0), saved with
    the shipped model's tokenizer and chat template and a processor resized to the geometry's image."""
    import torch
    from transformers import AutoProcessor

    from mmprune.bench.speed import GEOMETRIES, build
    from mmprune.zoo import SHIPPED_MODEL

    llava = sorted(g for g, spec in GEOMETRIES.items() if spec["family"] == "llava")
    if name not in llava:
        raise ValueError(f"geometry:{name}: the plugin serves LLaVA-1.5; LLaVA geometries: {', '.join(llava)}")
    spec = GEOMETRIES[name]
    processor = AutoProcessor.from_pretrained(SHIPPED_MODEL)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    torch.manual_seed(0)
    # fp32 on a CPU; bf16 where vLLM will run on a GPU (a 7B geometry is 14 GB to write instead of 28)
    model = build(spec, torch.device("cpu"), torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.config.image_token_id = image_token  # the shipped tokenizer's <image>
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    size = spec["vision"]["image_size"]
    processor.image_processor.size = {"shortest_edge": size}
    processor.image_processor.crop_size = {"height": size, "width": size}
    processor.patch_size = spec["vision"]["patch_size"]
    processor.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(folder: Path, port: int, overrides: list[str], max_model_len: int, cpu: bool) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len), "--limit-mm-per-prompt", json.dumps({"image": 1}),
               "--disable-uvicorn-access-log", *overrides]
    if cpu:  # fp32 and eager on a CPU (the CPU attention backend wants blocks of 32)
        command += ["--dtype", "float32", "--enforce-eager", "--block-size", "32"]
    return command


@contextmanager
def running_server(command: list[str], log_path: Path, port: int, startup_s: float = STARTUP_S,
                   env: dict | None = None):
    """The server, healthy within ``startup_s``; stopped (SIGTERM, then SIGKILL to the process group it leads) on
    exit. ``env``: environment variables set for it on top of this process's."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the vLLM server exited ({server.returncode}); its log: {log_path}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the vLLM server was not healthy after {startup_s} s; its log: {log_path}")
                time.sleep(1)
            yield server
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def image_url(image) -> str:
    png = io.BytesIO()
    image.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def payload(sample, max_tokens: int, allowed: list[int]) -> dict:
    return {"model": SERVED_NAME, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "allowed_token_ids": allowed,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(sample.image)}},
                {"type": "text", "text": sample.question}]}]}


def one_request(port: int, body: dict) -> dict:
    """One streamed chat completion: seconds to the first text and to the end, prompt and completion tokens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    first = None
    usage = {}
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:500]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    finally:
        connection.close()
    return {"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - start,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")}


def run_level(port: int, bodies: list[dict], concurrency: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda body: one_request(port, body), bodies))
    wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "wall_s": wall, "rps": len(results) / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "latency_median_s": statistics.median(r["latency"] for r in results),
            "prompt_tokens": statistics.mean(r["prompt_tokens"] or 0 for r in results),
            "completion_tokens": statistics.mean(r["completion_tokens"] or 0 for r in results)}


def configurations(methods: list[str], keeps: list) -> list[tuple[str, object]]:
    """``none`` first (the reference of every gain), then every method x budget."""
    return [("none", None)] + [(m, k) for m in methods if m != "none" for k in keeps]


def serving_sweep(model: str, methods: list[str], keeps: list, concurrency: list[int], requests: int | None = None,
                  max_tokens: int = 8, seed: int = 0, logs: Path | None = None, progress: bool = True) -> list[dict]:
    """One row per configuration x concurrency level (see the module docstring); ``requests`` per level (default
    ``max(8, 2 * concurrency)``)."""
    import torch

    from mmprune.data import synthetic

    check_vllm()
    for method in methods:
        if method != "none":
            plugin.engine_kwargs(method, keep=keeps[0])  # refuse what vLLM cannot serve before any server starts
    cpu = not torch.cuda.is_available()
    counts = [requests or max(8, 2 * c) for c in concurrency]
    samples = synthetic.generate(WARMUP + sum(counts), seed=seed)
    logs = Path(logs or tempfile.mkdtemp(prefix="mmprune-serving-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    with servable_model(model) as folder:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        allowed = sorted(i for i in tokenizer.get_vocab().values() if i not in set(tokenizer.all_special_ids))
        side = config.vision_config.image_size // config.vision_config.patch_size
        max_model_len = min(4096, side * side + 512)
        for method, keep in configurations(methods, keeps):
            overrides = plugin.server_args(method, keep=keep) if keep is not None else plugin.server_args(method)
            port = free_port()
            name = f"{method}-{keep}".replace("/", "_")
            if progress:
                print(f"serving: {method} keep={keep} (log {logs / name}.log)", file=sys.stderr, flush=True)
            with running_server(server_command(folder, port, overrides, max_model_len, cpu), logs / f"{name}.log",
                                port):
                for sample in samples[:WARMUP]:
                    one_request(port, payload(sample, max_tokens, allowed))
                offset = WARMUP
                for level, n in zip(concurrency, counts):
                    bodies = [payload(s, max_tokens, allowed) for s in samples[offset:offset + n]]
                    offset += n
                    row = {"model": model, "method": method, "keep": keep, "concurrency": level,
                           "max_tokens": max_tokens, "device": "cuda" if not cpu else "cpu",
                           **run_level(port, bodies, level)}
                    rows.append(row)
                    if progress:
                        print(f"  concurrency {level}: {row['rps']:.2f} req/s, "
                              f"TTFT median {row['ttft_median_s']:.3f} s", file=sys.stderr, flush=True)
    reference = {r["concurrency"]: r for r in rows if r["method"] == "none"}
    for row in rows:
        base = reference[row["concurrency"]]
        row["rps_vs_none"] = row["rps"] / base["rps"]
        row["ttft_vs_none"] = row["ttft_median_s"] / base["ttft_median_s"]
    return rows


def serving_markdown(rows: list[dict]) -> str:
    """One table: every configuration at every concurrency level, gains against ``none`` at the same level."""
    lines = ["| method | keep | prompt tokens | concurrency | requests | req/s | x none | TTFT median (s) | "
             "TTFT p90 (s) | TTFT / none |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["concurrency"], r["method"] != "none", r["method"], str(r["keep"]))):
        lines.append(f"| {row['method']} | {'' if row['keep'] is None else row['keep']} | {row['prompt_tokens']:.0f} | "
                     f"{row['concurrency']} | {row['requests']} | {row['rps']:.2f} | {row['rps_vs_none']:.2f} | "
                     f"{row['ttft_median_s']:.3f} | {row['ttft_p90_s']:.3f} | {row['ttft_vs_none']:.2f} |")
    return "\n".join(lines)
