"""Command line: ``mmprune methods`` and ``mmprune run``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mmprune
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


def cmd_methods(args: argparse.Namespace) -> None:
    rows = [(name, cls.stage, cls.summary) for name, cls in sorted(mmprune.METHODS.items())]
    width = max(len(r[0]) for r in rows)
    stage_width = max(len(r[1]) for r in rows)
    print(f"{'method':<{width}}  {'stage':<{stage_width}}  description")
    for name, stage, summary in rows:
        print(f"{name:<{width}}  {stage:<{stage_width}}  {summary}")


def load(model_id: str):
    """Model and processor from a local path or hub id, through the stock HF auto classes."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {model_id!r} could not be loaded: {str(exc).splitlines()[0]}") from None
    return model.eval(), processor


def build_inputs(processor, image, prompt: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"USER: <image>\n{prompt} ASSISTANT:"
    return processor(images=image, text=text, return_tensors="pt")


def run_once(model, processor, pruner, image, prompt: str, max_new_tokens: int) -> dict:
    import torch

    inputs = build_inputs(processor, image, prompt)
    started = time.perf_counter()
    with pruner.attach(model), torch.no_grad():
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
        "kept": final_kept(stats)[0],
    }


def cmd_run(args: argparse.Namespace) -> None:
    from PIL import Image

    image_path = Path(args.image)
    if not image_path.is_file():
        raise CliError(f"--image {args.image!r}: no such file")
    keep = parse_keep(args.keep)
    try:
        pruner = mmprune.get(args.method, keep=keep)
    except ValueError as exc:
        raise CliError(f"--method: {exc}") from None
    try:
        image = Image.open(image_path).convert("RGB")
    except OSError as exc:
        raise CliError(f"--image {args.image!r} is not a readable image: {exc}") from None
    model, processor = load(args.model)
    try:
        result = run_once(model, processor, pruner, image, args.prompt, args.max_new_tokens)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
        return
    print(result["answer"])
    print(f"[{result['method']} keep={result['keep']}] visual tokens {result['visual_tokens_before']} -> "
          f"{result['visual_tokens_after']} (selection {result['selection_ms']:.1f} ms)")


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


def cmd_bench(args: argparse.Namespace) -> None:
    from mmprune.bench.report import write_results
    from mmprune.bench.sweep import SweepSettings, run_sweep

    methods = mmprune.available() if args.methods == "all" else parse_list(args.methods, "--methods", str)
    unknown = [m for m in methods if m not in mmprune.METHODS]
    if unknown:
        raise CliError(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(mmprune.available())}")
    keeps = [parse_keep(k) for k in parse_list(args.keep, "--keep", str)]
    if args.speed:
        return bench_speed(args, [m for m in methods if m != "none"], keeps)
    samples = load_data(args.data, args.seed)
    model, processor = load(args.model)
    settings = SweepSettings(methods=methods, keeps=keeps, batch=args.batch, reps=args.reps,
                             decode_steps=args.decode_steps, seed=args.seed)
    rows = run_sweep(model, processor, samples, settings)
    config = {"model": args.model, "data": args.data, "questions": len(samples), "methods": methods,
              "keeps": keeps, "seed": args.seed, "batch": args.batch, "reps": args.reps,
              "timing_samples": settings.timing_samples, "decode_steps": args.decode_steps}
    paths = write_results(rows, args.out, config)
    failed = [f"{r['method']}@{r['keep']}" for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} rows ({len(failed)} failed{': ' + ', '.join(failed) if failed else ''}); wrote "
          + ", ".join(str(p) for p in paths.values()))


def bench_speed(args: argparse.Namespace, methods: list[str], keeps: list) -> None:
    import json as json_module

    from mmprune.bench.speed import GEOMETRIES, speed_markdown, speed_sweep

    if args.geometry not in GEOMETRIES:
        raise CliError(f"--geometry {args.geometry!r}: expected one of {', '.join(GEOMETRIES)}")
    batches = parse_list(args.batches, "--batches", int)
    rows = speed_sweep(args.geometry, methods, keeps, batches=batches, reps=args.reps,
                       decode_steps=args.decode_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json_module.dumps(rows, indent=1) + "\n")
    (out / "speed.md").write_text(speed_markdown(rows) + "\n")
    print(speed_markdown(rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprune", description="Visual token pruning for HF vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods").set_defaults(func=cmd_methods)
    run = sub.add_parser("run", help="answer one prompt about one image with a pruning method")
    run.add_argument("--model", default=str(SHIPPED_MODEL),
                     help="local path or hub id of a supported HF VLM (default: the shipped shapes-llava model)")
    run.add_argument("--method", required=True, help="method name (see `mmprune methods`)")
    run.add_argument("--keep", required=True, help="int: visual tokens kept per image; float in (0, 1]: fraction")
    run.add_argument("--image", required=True, help="image file")
    run.add_argument("--prompt", required=True, help="question about the image")
    run.add_argument("--max-new-tokens", type=int, default=32)
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
                       help="with --speed: small (CPU), llava-1.5-7b, llava-next-7b or qwen2.5-vl-7b")
    bench.add_argument("--batches", default="1,16", help="with --speed: comma-separated batch sizes")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CliError as exc:
        print(f"mmprune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
