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
