"""Command line: ``mmprune methods`` and ``mmprune run``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import mmprune
from mmprune import loading
from mmprune.data.inputs import Request, model_inputs
from mmprune.loading import DTYPES
from mmprune.engine.session import final_kept
from mmprune.zoo import SHIPPED_MODEL


class CliError(Exception):
    """A user error reported as one line on stderr with a non-zero exit."""


def parse_keep(text: str) -> int | float:
    """``64`` -> 64 tokens per image; ``0.25`` -> a quarter of each image's tokens."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise CliError(f"--keep {text!r} is not a number: expected {mmprune.budget.ALLOWED}") from None
    try:
        return mmprune.validate_keep(value)
    except ValueError as exc:
        raise CliError(f"--keep: {exc}") from None


GENERIC_HELP = {
    "keep": "the budget: an int (tokens) or a float in (0, 1] (fraction)",
    "positions": "'renumber', 'original' or None (the family's reference behaviour)",
    "keep_audio": "the audio budget, counted as keep is (None: keep)",
}


def show(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def paper_citation(doc: list[str]) -> str:
    """The docstring's ``Paper:`` paragraph (its lines up to the next blank line), as one line."""
    start = next((i for i, line in enumerate(doc) if line.startswith("Paper:")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(doc)) if not doc[i]), len(doc))
    return " ".join(doc[start:end]).removeprefix("Paper:").strip()


def method_details(name: str) -> list[str]:
    """Lines describing one method: stage, what keep means, every hyper-parameter with default and allowed values."""
    cls = mmprune.METHODS[name]
    doc = [line.strip() for line in (cls.__doc__ or "").strip().splitlines()]
    paper = paper_citation(doc)
    lines = [f"{name} ({cls.stage}): {cls.summary}", f"  paper: {paper or doc[0] if doc else ''}",
             f"  keep means: {cls.keep_means} (default {show(cls.keep)})"]
    shown = set(mmprune.registry.parameters(cls))
    for spec in fields(cls):
        if spec.name not in shown:
            continue
        check = spec.metadata.get("check")
        allowed = f"; allowed: {check.describe()}" if check is not None else ""
        help_text = spec.metadata.get("help") or GENERIC_HELP.get(spec.name, "")
        lines.append(f"  {spec.name} = {show(spec.default)}: {help_text}{allowed}")
    return lines


def cmd_methods(args: argparse.Namespace) -> None:
    if args.name is not None:
        try:
            name = mmprune.registry.resolve_name(args.name)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        print("\n".join(method_details(name)))
        return
    rows = [(name, cls.stage, cls.summary) for name, cls in sorted(mmprune.METHODS.items())]
    width = max(len(r[0]) for r in rows)
    stage_width = max(len(r[1]) for r in rows)
    print(f"{'method':<{width}}  {'stage':<{stage_width}}  description")
    for name, stage, summary in rows:
        print(f"{name:<{width}}  {stage:<{stage_width}}  {summary}")
        if args.verbose:
            print("\n".join(method_details(name)[2:]))


def resolve_device(device: str | None) -> str:
    try:
        return loading.resolve_device(device)
    except ValueError as exc:
        raise CliError(f"--device {exc}") from None


def load(model_id: str, device: str = "cpu", dtype: str = "auto", attn_implementation: str | None = None):
    """Model and processor from a local path or hub id, through the stock HF auto classes."""
    try:
        return loading.load(model_id, device, dtype, attn_implementation)
    except ValueError as exc:
        raise CliError(f"--model {exc}") from None


def parse_params(items: list[str] | None) -> dict:
    """``--param name=value`` pairs; values are Python literals (``[4, 8]``, ``0.5``, ``True``), else strings."""
    params = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--param {item!r}: expected NAME=VALUE, e.g. --param layers=[4,8]")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        params[name.strip()] = value
    return params


def run_once(model, processor, pruner, images: list, prompt: str, max_new_tokens: int, frames: list | None = None,
             fps: float = 2.0) -> dict:
    import torch

    request = Request.of(prompt, images, [frames] if frames else [])
    try:
        inputs = {k: v.to(model.device) for k, v in model_inputs(model, processor, [request], fps).items()}
    except ValueError as exc:
        raise CliError(f"{'--video' if frames else '--image'}: {exc}") from None
    started = time.perf_counter()
    with pruner.attach(model, tokenizer=processor), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    stats = pruner.stats
    sample = stats["samples"][0]
    return {
        "answer": answer,
        "method": pruner.name,
        "keep": pruner.keep,
        "visual_tokens_before": sample["visual_tokens_before"],
        "visual_tokens_after": sample["visual_tokens_after"],
        "tokens_per_layer": sample["tokens_per_layer"],
        "equivalent_tokens": sample["equivalent_tokens"],
        "positions": stats["positions"],
        "selection_ms": stats["selection_ms"],
        "generate_s": elapsed,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "kept": final_kept(stats)[0],
        # per image: output tokens that carry merged/pooled content; they count in visual_tokens_after and occupy a
        # slot listed in kept (their target's), so kept alone under-counts what a merging method passes on
        "merged": [image["merged"] for image in sample["images"]],
        "videos": [{**{key: video.get(key) for key in ("before", "after", "frames", "frame_times", "kept_per_frame",
                                                       "merged", "note")}, "kept": kept}
                   for video, kept in zip(sample["videos"], final_kept(stats, "video")[0])],
        "stats": stats,
    }


def read_image(path_text: str):
    from PIL import Image

    path = Path(path_text)
    if path.is_dir():
        raise CliError(f"--image {path_text!r} is a directory: expected an image file")
    if not path.is_file():
        raise CliError(f"--image {path_text!r}: no such file")
    try:
        return Image.open(path).convert("RGB")
    except OSError as exc:
        raise CliError(f"--image {path_text!r} is not a readable image: {exc}") from None


def save_kept(path_text: str, images: list, stats: dict) -> list[str]:
    """One drawing per image: FILE for a single image, FILE's stem + _<i> for several."""
    from mmprune.viz import describe, draw_kept

    path = Path(path_text)
    if path.is_dir():
        raise CliError(f"--save-kept {path_text!r} is a directory: expected an image file name such as kept.png")
    written = []
    for i, image in enumerate(images):
        target = path if len(images) == 1 else path.with_name(f"{path.stem}_{i}{path.suffix or '.png'}")
        try:
            draw_kept(image, stats, image=i, title=describe(stats, image=i)).save(target)
        except (OSError, ValueError) as exc:
            raise CliError(f"--save-kept {str(target)!r} could not be written: {exc}") from None
        written.append(str(target))
    return written


def cmd_run(args: argparse.Namespace) -> None:
    keep = parse_keep(args.keep)
    try:
        pruner = mmprune.get(args.method, keep=keep, **parse_params(args.param))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not args.image and not args.video:
        raise CliError("give at least one --image or a --video")
    images = [read_image(path) for path in args.image or ()]
    frames = None
    if args.video:
        from mmprune.data.video import read_frames

        try:
            frames = read_frames(args.video, fps=args.fps, max_frames=args.max_frames)
        except ValueError as exc:
            raise CliError(f"--video: {exc}") from None
    device = resolve_device(args.device)
    model, processor = load(args.model, device, args.dtype, args.attn_implementation)
    try:
        result = run_once(model, processor, pruner, images, args.prompt, args.max_new_tokens, frames, args.fps)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    stats = result.pop("stats")
    if args.save_kept and images:
        result["saved"] = save_kept(args.save_kept, images, stats)
    if args.json:
        print(json.dumps(result))
        return
    print(result["answer"])
    merged = sum(result["merged"])
    print(f"[{result['method']} keep={result['keep']}] visual tokens {result['visual_tokens_before']} -> "
          f"{result['visual_tokens_after']}{f' ({merged} merged)' if merged else ''} "
          f"(selection {result['selection_ms']:.1f} ms)")
    for video in result["videos"]:
        print(f"video: {video['before']} -> {video['after']} tokens over {video['frames'][0]} temporal grids "
              f"(kept per grid {video['kept_per_frame']})" + (f"; {video['note']}" if video.get("note") else ""))
    for path in result.get("saved", []):
        print(f"kept tokens drawn in {path}")


def parse_list(text: str, what: str, convert) -> list:
    try:
        values = [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} {text!r} is not a comma-separated list") from None
    if not values:
        raise CliError(f"{what} is empty")
    return values


def load_data(spec: str, seed: int):
    from mmprune.data import synthetic
    from mmprune.data.jsonl import load_jsonl

    if spec.startswith("synthetic:"):
        count = spec.removeprefix("synthetic:")
        if not count.isdigit() or int(count) < 1:
            raise CliError(f"--data {spec!r}: expected synthetic:N with N a positive integer")
        return synthetic.generate(int(count), seed=seed)
    if spec.endswith(".jsonl"):
        try:
            return load_jsonl(spec)
        except ValueError as exc:
            raise CliError(f"--data: {exc}") from None
    raise CliError(f"--data {spec!r}: expected synthetic:N or a .jsonl file")


def display_path(text: str) -> str:
    """What results files record of a user's path: the shipped model by name, a relative path as given, an absolute
    one by its last part (no machine's directory layout in shared results)."""
    path = Path(text)
    if path.resolve() == Path(SHIPPED_MODEL).resolve():
        return "shapes-llava (mmprune/zoo/shapes_llava)"
    return path.name if path.is_absolute() else text


def positive(value: int, option: str) -> int:
    if value < 1:
        raise CliError(f"{option} {value}: expected an int >= 1")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from collections import Counter

    from mmprune.bench.report import write_results
    from mmprune.bench.sweep import SweepSettings, run_sweep

    methods = bench_methods(args.methods)
    keeps = [parse_keep(k) for k in parse_list(args.keep, "--keep", str)]
    for option, value in (("--batch", args.batch), ("--reps", args.reps), ("--decode-steps", args.decode_steps)):
        positive(value, option)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out!r} is an existing file: expected a folder (created if missing)")
    if args.serving:
        return bench_serving(args, methods, keeps)
    if args.speed:
        return bench_speed(args, [m for m in methods if m != "none"], keeps)
    samples = load_data(args.data, args.seed)
    model, processor = load(args.model)
    settings = SweepSettings(methods=methods, keeps=keeps, batch=args.batch, reps=args.reps,
                             decode_steps=args.decode_steps, seed=args.seed)
    rows = run_sweep(model, processor, samples, settings)
    config = {"model": display_path(args.model), "data": display_path(args.data), "questions": len(samples),
              "methods": methods, "keeps": keeps, "seed": args.seed, "batch": min(args.batch, len(samples)),
              "reps": args.reps, "timing_batch": min(settings.timing_samples, len(samples)),
              "decode_steps": args.decode_steps, "family_counts": dict(Counter(s.family for s in samples))}
    paths = write_results(rows, out, config)
    failed = [f"{r['method']}@{r['keep']}" for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} rows ({len(failed)} failed{': ' + ', '.join(failed) if failed else ''}); wrote "
          + ", ".join(str(p) for p in paths.values()))
    requested = set(methods) - {"none"} or {"none"}
    if not any(r["status"] == "ok" for r in rows if r["method"] in requested):
        print(f"mmprune: error: no row of {', '.join(sorted(requested))} succeeded (see the status column)",
              file=sys.stderr)
        return 1
    return 0


def bench_methods(text: str) -> list[str]:
    """``--methods``: names, or ``all``: every method that prunes images (the benchmark's questions are about images;
    video- and audio-only methods would pass them through whole and only repeat the unpruned row)."""
    if text == "all":
        return [m for m in mmprune.available() if m == "none" or mmprune.METHODS[m].prunes("image")]
    return [resolve_method(m) for m in parse_list(text, "--methods", str)]


def resolve_method(name: str) -> str:
    try:
        return mmprune.registry.resolve_name(name)
    except ValueError as exc:
        raise CliError(f"--methods: {exc}") from None


def bench_speed(args: argparse.Namespace, methods: list[str], keeps: list) -> int:
    import json as json_module

    import torch

    from mmprune.bench.speed import GEOMETRIES, speed_markdown, speed_sweep

    if args.geometry not in GEOMETRIES:
        raise CliError(f"--geometry {args.geometry!r}: expected one of {', '.join(GEOMETRIES)}")
    batches = [positive(b, "--batches") for b in parse_list(args.batches or ("8" if args.side_by_side else "1,16"),
                                                            "--batches", int)]
    if args.threads is not None:
        torch.set_num_threads(positive(args.threads, "--threads"))
    if args.side_by_side:
        return bench_side_by_side(args, methods, keeps, batches)
    keep_audio = None if args.keep_audio is None else parse_list(args.keep_audio, "--keep-audio", parse_keep)[0]
    try:
        rows = speed_sweep(args.geometry, methods, keeps, batches=batches, reps=args.reps,
                           decode_steps=args.decode_steps, keep_audio=keep_audio,
                           attn_implementation=args.attn_implementation)
    except ValueError as exc:  # the attention implementation is not available here
        raise CliError(f"--attn-implementation: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json_module.dumps(rows, indent=1) + "\n")
    (out / "speed.md").write_text(speed_markdown(rows) + "\n")
    print(speed_markdown(rows))
    if not any(r["status"] == "ok" for r in rows):
        print("mmprune: error: no method row succeeded (see the status column)", file=sys.stderr)
        return 1
    return 0


def bench_side_by_side(args: argparse.Namespace, methods: list[str], keeps: list, batches: list[int]) -> int:
    """``--speed --side-by-side``: side_by_side.json and side_by_side.md in ``--out``."""
    import json as json_module

    from mmprune.bench.side_by_side import side_by_side, side_by_side_markdown

    if len(batches) != 1 or batches[0] < 2:
        raise CliError(f"--batches {args.batches}: with --side-by-side expected one B >= 2 (one batch of B against "
                       "B one by one)")
    if not methods:
        raise CliError("--methods: name at least one method besides none (the unpruned model is always timed)")
    if args.attn_implementation == "flash_attention_2":  # fail before building the model
        from importlib.util import find_spec

        if find_spec("flash_attn") is None:
            raise CliError("--attn-implementation flash_attention_2 needs the flash-attn package and a GPU; it is "
                           "not installed here")
    result = side_by_side(args.geometry, methods, keeps, batch=batches[0], reps=args.reps,
                          attn_implementation=args.attn_implementation)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = side_by_side_markdown(result)
    (out / "side_by_side.json").write_text(json_module.dumps(result, indent=1) + "\n")
    (out / "side_by_side.md").write_text(text + "\n")
    print(text)
    if not any(r["status"] == "ok" for r in result["rows"] if r["implementation"] == "mmprune"):
        print("mmprune: error: no method row succeeded (see the status column)", file=sys.stderr)
        return 1
    return 0


def bench_serving(args: argparse.Namespace, methods: list[str], keeps: list) -> int:
    """``--serving``: vLLM's OpenAI-compatible server with and without pruning (mmprune/bench/serving.py)."""
    import json as json_module

    from mmprune.bench.serving import check_vllm, serving_markdown, serving_sweep
    from mmprune.integrations.vllm import engine_kwargs, servable_methods

    if args.speed:
        raise CliError("--serving and --speed are separate benchmarks: pass one")
    if args.methods == "all":
        raise CliError("--serving starts one vLLM server per method and budget: name the methods (e.g. --methods "
                       f"fastervlm,visionzip); vLLM serves {', '.join(servable_methods())}")
    concurrency = [positive(c, "--concurrency") for c in parse_list(args.concurrency, "--concurrency", int)]
    if args.requests is not None:
        positive(args.requests, "--requests")
    try:
        for method in methods:
            if method != "none":
                engine_kwargs(method, keep=keeps[0])
        check_vllm()
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"--serving: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = serving_sweep(args.model, methods, keeps, concurrency, requests=args.requests,
                         max_tokens=args.decode_steps, seed=args.seed, logs=out / "serving_logs")
    (out / "serving.json").write_text(json_module.dumps(rows, indent=1) + "\n")
    (out / "serving.md").write_text(serving_markdown(rows) + "\n")
    print(serving_markdown(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprune", description="Visual token pruning for HF vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    methods = sub.add_parser("methods", help="list the registered methods; `methods NAME` details one")
    methods.add_argument("name", nargs="?", help="a method: its hyper-parameters, defaults and what keep means")
    methods.add_argument("--verbose", "-v", action="store_true", help="every method's hyper-parameters")
    methods.set_defaults(func=cmd_methods)
    run = sub.add_parser("run", help="answer one prompt about one or more images with a pruning method")
    run.add_argument("--model", default=str(SHIPPED_MODEL),
                     help="local path or hub id of a supported HF VLM (default: the shipped shapes-llava model)")
    run.add_argument("--method", required=True, help="method name (see `mmprune methods`)")
    run.add_argument("--keep", required=True, help="int: visual tokens kept per image; float in (0, 1]: fraction")
    run.add_argument("--image", action="append", help="image file (repeat for several images in one prompt)")
    run.add_argument("--video", help="a video file (decoded with PyAV) or a folder of frames; Qwen2-VL/2.5-VL models")
    run.add_argument("--fps", type=float, default=2.0, help="with --video: frames per second sampled (a folder's "
                     "frames are taken as sampled at this rate)")
    run.add_argument("--max-frames", type=int, default=32, help="with --video: at most this many frames")
    run.add_argument("--prompt", required=True, help="question about the image")
    run.add_argument("--param", action="append", metavar="NAME=VALUE",
                     help="a method hyper-parameter, e.g. --param layers=[4,8] (repeatable; see `mmprune methods NAME`)")
    run.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: bfloat16 on GPU, float32 "
                     "on CPU)")
    run.add_argument("--attn-implementation", default=None, choices=("sdpa", "eager", "flash_attention_2"),
                     help="the model's attention implementation (default: transformers' choice)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--save-kept", metavar="FILE", help="draw each image with its pruned tokens greyed out (PNG)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", help="accuracy, tokens, FLOPs, latency, KV memory and stability per method x keep")
    bench.add_argument("--model", default=str(SHIPPED_MODEL), help="model folder or hub id (default: shipped model)")
    bench.add_argument("--methods", default="all", help="comma-separated method names, or all")
    bench.add_argument("--keep", default="0.33,0.22,0.11", help="comma-separated budgets (see each method's keep)")
    bench.add_argument("--data", default="synthetic:200", help="synthetic:N or a .jsonl file (see README)")
    bench.add_argument("--seed", type=int, default=0, help="picks the synthetic questions and the noise")
    bench.add_argument("--batch", type=int, default=16)
    bench.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median)")
    bench.add_argument("--decode-steps", type=int, default=8, help="new tokens of the end-to-end timing")
    bench.add_argument("--out", required=True, help="folder for results.json/.csv/.md and the plots")
    bench.add_argument("--speed", action="store_true",
                       help="time methods on a random-weight model of --geometry instead of answering questions")
    bench.add_argument("--geometry", default="small",
                       help="with --speed: small, small-video or small-omni (CPU), llava-1.5-7b, llava-next-7b, "
                            "qwen2.5-vl-7b, qwen2.5-vl-7b-video or qwen2.5-omni-7b")
    bench.add_argument("--batches", default=None,
                       help="with --speed: comma-separated batch sizes (default 1,16); with --side-by-side: B, the "
                            "prompts timed as one batch and one by one (default 8)")
    bench.add_argument("--side-by-side", action="store_true",
                       help="with --speed: time the unpruned model, each method and the reference-style "
                            "implementations of FastV and FasterVLM (LLaVA geometries), each as one batch of B and "
                            "as B one by one, with encoder time, min-max spread, noise flags and the machine; writes "
                            "side_by_side.md/.json")
    bench.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                       help="with --speed: the random-weight model's attention (flash_attention_2: GPU with "
                            "flash-attn installed)")
    bench.add_argument("--threads", type=int, default=None,
                       help="with --speed: torch CPU threads (default: torch's; the results record it)")
    bench.add_argument("--keep-audio", default=None,
                       help="with --speed: the audio budget of the methods that prune audio (default: their keep)")
    bench.add_argument("--serving", action="store_true",
                       help="requests/s and time to first token of vLLM's OpenAI server with and without pruning "
                            "(needs vLLM: make vllm, then .venv-vllm/bin/python -m mmprune bench --serving); --model "
                            "may be geometry:small (random weights); --decode-steps new tokens per request")
    bench.add_argument("--concurrency", default="1,4,16",
                       help="with --serving: comma-separated numbers of requests in flight")
    bench.add_argument("--requests", type=int, default=None,
                       help="with --serving: requests per concurrency level (default: max(8, 2 x concurrency))")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CliError as exc:
        print(f"mmprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
