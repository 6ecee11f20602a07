"""Answer QA samples with a VLM through its own processor and ``generate()``, and score the answers."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from mmprune.data.metrics import score
from mmprune.engine.session import final_kept


def prompts(processor, questions: list[str]) -> list[str]:
    """One single-turn chat prompt per question, with the image first (the processor's own chat template)."""
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True) for q in questions]


@torch.no_grad()
def answer(model, processor, images, questions: list[str], pruner=None, max_new_tokens: int = 4,
           timed: bool = False) -> dict:
    """Greedy answers for one batch (left-padded): {"answers": [...], "prefill_s", "total_s"}; with ``timed`` a
    separate prefill-only forward is timed first (else prefill_s is 0)."""
    inputs = processor(text=prompts(processor, questions), images=list(images), padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    attach = pruner.attach(model, tokenizer=processor) if pruner is not None else nullcontext()
    with attach:
        prefill = 0.0
        if timed:
            start = time.perf_counter()
            model(**inputs, use_cache=True)  # prefill on its own; generate() below repeats it
            prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        total = time.perf_counter() - start
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    image_token = getattr(model.config, "image_token_id", None)
    real = inputs["attention_mask"].bool()
    text_tokens = (real & (inputs["input_ids"] != image_token)).sum(1).tolist()
    return {"answers": [t.strip() for t in texts], "prefill_s": prefill, "total_s": total,
            "stats": pruner.stats if pruner is not None else None, "text_tokens": text_tokens}


def family_accuracy(samples, answers: list[str]) -> dict:
    """{"accuracy", "families": {family: accuracy}}: each answer scored by its sample's metric."""
    per_family = defaultdict(list)
    for s, a in zip(samples, answers):
        per_family[s.family].append(score(a, s.answers, s.metric))
    correct = [ok for oks in per_family.values() for ok in oks]
    return {"accuracy": sum(correct) / len(correct), "families": {f: sum(v) / len(v) for f, v in per_family.items()}}


def evaluate(model, processor, samples, pruner=None, batch_size: int = 50, max_new_tokens: int = 4,
             timed: bool = False, progress: str | None = None) -> dict:
    """Accuracy overall and per family: {"accuracy", "families": {family: accuracy}, "answers", "prefill_s",
    "kept": per sample, per image, the final kept token indices, "sample_stats": the pruner's per-sample stats
    (both empty without a pruner), "text_tokens": real non-image tokens per prompt, "selection_ms"}. ``progress``:
    a label for a progress bar over the batches (none when None)."""
    answers, prefill, kept, sample_stats, text_tokens, selection_ms = [], 0.0, [], [], [], 0.0
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", leave=False) if progress else starts:
        chunk = samples[start:start + batch_size]
        out = answer(model, processor, [s.image for s in chunk], [s.question for s in chunk], pruner,
                     max_new_tokens, timed)
        answers += out["answers"]
        prefill += out["prefill_s"]
        text_tokens += out["text_tokens"]
        if out["stats"] is not None:
            kept += final_kept(out["stats"])
            sample_stats += out["stats"]["samples"]
            selection_ms += out["stats"]["selection_ms"]
    return {**family_accuracy(samples, answers), "answers": answers, "prefill_s": prefill, "kept": kept,
            "sample_stats": sample_stats, "text_tokens": text_tokens, "selection_ms": selection_ms}
