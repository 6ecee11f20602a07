"""``--model mmprune`` for lmms-eval: any model family mmprune supports, any registered method, real batches.

    python -m lmms_eval --model mmprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visionzip,keep=64 \\
        --tasks gqa,pope,mme --batch_size 16 --output_path results/

A chat model for lmms-eval (``is_simple = False``), registered through lmms-eval's ``lmms_eval.models`` entry point
(:mod:`mmprune.integrations.lmms_eval_plugin`), so lmms-eval is neither forked nor copied. Each request's chat
messages (images, videos, text, as the task writes them) become one :class:`mmprune.data.inputs.Request`; requests
with the same generation settings are answered in left-padded batches of ``batch_size``, sorted by task and document
id, through ``model.generate()`` with the pruner attached around each call (``method=none`` attaches nothing: the
stock model, the reference row). After the run, the mean visual tokens per sample (before pruning, into the LLM, at
the last layer, layer-averaged equivalent) and the selection time per sample go to lmms-eval's throughput metrics,
so the results JSON holds them as ``throughput.avg_mmprune_*``; ``stats_out=FILE`` also writes one JSON line per
batch (task, document ids, the pruner's full ``stats``).

Model arguments (``--model_args``, comma separated): ``pretrained`` (a folder or hub id; default: the shipped
model), ``method`` (default ``none``), ``device``, ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``),
``attn_implementation``, ``batch_size``, ``max_new_tokens`` (when the task sets none), ``fps`` and ``max_frames``
(how videos are sampled), ``stats_out``, ``trust_remote_code``; every other argument is a hyper-parameter of the
method, validated as :func:`mmprune.get` does (``layers=[8,16]``, ``positions=None`` are read as Python literals).
lmms-eval reads ``keep=1`` as the int 1, i.e. one token per image: write ``keep=1.0`` for everything.

One process (no ``accelerate launch`` data parallelism); generation requests only (lmms-eval sends chat models no
loglikelihood requests); audio in a chat message is refused.

What this module assumes about lmms-eval, which promises no stable plugin API, is all here: the entry-point
manifest (:mod:`mmprune.integrations.lmms_eval_plugin`), the ``lmms`` base class, a chat request's ``args``
``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``, ``ChatMessages.to_hf_messages``,
``GenerationResult`` / ``TokenCounts`` and ``log_metrics``. CI runs it on :data:`TESTED_LMMS_EVAL` (the version
``pyproject.toml``'s extra and ``make lmms-eval`` install); another version warns at construction, and a request
of another layout is refused.
"""

from __future__ import annotations

import ast
import json
import os
import time
import warnings
from importlib.metadata import version as installed_version
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from tqdm.auto import tqdm

import mmprune
from mmprune import loading, upstream
from mmprune.data.inputs import Request, model_inputs, tokenizer_of
from mmprune.data.video import check_fps
from mmprune.engine.session import final_kept
from mmprune.models import adapter_for
from mmprune.zoo import SHIPPED_MODEL

TESTED_LMMS_EVAL = "0.7.3"
REQUEST_FIELDS = ("context", "doc_to_messages", "gen_kwargs", "doc_id", "task", "split")
TOKEN_COLUMNS = ("visual_tokens_before", "visual_tokens_llm_input", "visual_tokens_after", "equivalent_tokens")


def check_lmms_eval_version(version: str | None = None) -> bool:
    """Warn when ``version`` (default: the installed lmms-eval) is not the tested one; returns whether it is."""
    version = version or installed_version("lmms_eval")
    if version != TESTED_LMMS_EVAL:
        warnings.warn(f"mmprune's lmms-eval model is tested with lmms-eval {TESTED_LMMS_EVAL} and {version} is "
                      "installed: requests of another layout are refused, but results on this version are untested; "
                      f"install the tested one (pip install lmms-eval=={TESTED_LMMS_EVAL})",
                      upstream.UpstreamVersionWarning, stacklevel=3)
    return version == TESTED_LMMS_EVAL


def literal(value):
    """A model argument as a Python value: lmms-eval already made numbers and booleans; lists, dicts, tuples,
    ``None`` and quoted strings arrive as text."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def positive_int(value, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{what}={value!r}: expected a positive integer")
    return number


class MMPrune(lmms):
    """lmms-eval chat model: a stock HF VLM with an mmprune method attached around each batched ``generate``."""

    is_simple = False

    def __init__(self, pretrained: str | None = None, method: str = "none", device: str | None = None,
                 dtype: str = "auto", attn_implementation: str | None = None, batch_size=1,
                 max_new_tokens: int = 128, fps: float = 2.0, max_frames: int = 32, stats_out: str | None = None,
                 trust_remote_code: bool = False, **params) -> None:
        super().__init__()
        check_lmms_eval_version()
        # everything that can be checked without the model first, so a typo fails before any loading
        params = {name: literal(value) for name, value in params.items()}
        name = mmprune.registry.resolve_name(method)
        pruner = mmprune.get(name, **params)  # none too: it refuses any keep but 1.0
        self.pruner = None if pruner.name == "none" else pruner  # none: the stock model, nothing attached
        if str(batch_size) == "auto":
            raise ValueError("batch_size=auto: give a number (mmprune answers requests in batches of that size)")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        self.max_frames = positive_int(max_frames, "max_frames")
        self.fps = float(fps)
        check_fps(self.fps)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1:
            raise ValueError(f"mmprune's lmms-eval model runs in one process; this run has WORLD_SIZE={processes} "
                             "(drop accelerate launch)")
        self.stats_out = Path(stats_out) if stats_out else None
        if self.stats_out is not None:
            self.stats_out.parent.mkdir(parents=True, exist_ok=True)
            self.stats_out.write_text("")
        self.method = name
        self.device_name = loading.resolve_device(device)
        self.model, self.processor = loading.load(str(pretrained or SHIPPED_MODEL), self.device_name, dtype,
                                                  attn_implementation, bool(trust_remote_code))
        self.adapter = adapter_for(self.model)  # an unsupported family fails here, before any request
        if self.pruner is not None:
            # model-dependent values (and a tokenizer a text-guided method cannot read) fail at attach
            self.pruner.attach(self.model, tokenizer=self.processor).detach()
        tokenizer = tokenizer_of(self.processor)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # lmms-eval's interface -----------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        for request in requests:
            if not isinstance(request.args, tuple) or len(request.args) != len(REQUEST_FIELDS):
                raise RuntimeError(f"lmms-eval {installed_version('lmms_eval')} sent a request whose arguments are not "
                                   f"({', '.join(REQUEST_FIELDS)}), the layout of lmms-eval {TESTED_LMMS_EVAL}'s "
                                   "chat requests that mmprune's model reads")
        results: list[GenerationResult | None] = [None] * len(requests)
        batches = self.batches([request.args for request in requests])
        accounting: list[dict] = []
        started = time.perf_counter()
        generated = 0
        for batch in tqdm(batches, desc="mmprune", unit="batch", disable=self.rank != 0):
            args = [requests[i].args for i in batch]
            texts, counts, stats = self.answer(args)
            for i, text, count in zip(batch, texts, counts):
                results[i] = GenerationResult(text=text, token_counts=TokenCounts(output_tokens=count))
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[2]), text)
            generated += sum(counts)
            accounting += token_accounting(stats)
            self.record(args, stats)
        elapsed = time.perf_counter() - started
        if accounting:
            log_metrics(elapsed, generated, generated / elapsed if elapsed > 0 else 0.0,
                        additional_metrics=summary(accounting))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mmprune's lmms-eval model answers single-round generation tasks; multi-round "
                                  "tasks are not supported")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("mmprune's lmms-eval model is a chat model: lmms-eval sends it generation "
                                  "requests only (loglikelihood tasks need a simple model)")

    # batching --------------------------------------------------------------------------------------------------

    def batches(self, args: list[tuple]) -> list[list[int]]:
        """Request indices in batches of ``batch_size``: same generation settings within a batch, each group in
        (task, document id) order."""
        groups: dict[str, list[int]] = {}
        for i, (_, _, gen_kwargs, doc_id, task, _) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: (args[i][4], args[i][3]))
            batches += [indices[s:s + self.batch_size] for s in range(0, len(indices), self.batch_size)]
        return batches

    def request(self, arg: tuple) -> Request:
        _, doc_to_messages, _, doc_id, task, split = arg
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        return Request.from_chat(chat.to_hf_messages(), fps=self.fps, max_frames=self.max_frames)

    def answer(self, args: list[tuple]) -> tuple[list[str], list[int], dict]:
        """Texts, generated-token counts and the batch's stats for requests sharing their generation settings."""
        gen_kwargs = dict(args[0][2])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or ())
        inputs = model_inputs(self.model, self.processor, [self.request(a) for a in args], self.fps)
        inputs = {key: value.to(self.model.device, self.model.dtype if key.startswith("pixel_values") else None)
                  for key, value in inputs.items()}
        settings = self.generation_settings(gen_kwargs)
        with torch.inference_mode():
            if self.pruner is None:
                out = self.model.generate(**inputs, **settings)
                stats = placeholder_stats(self.adapter, inputs)
            else:
                with self.pruner.attach(self.model, tokenizer=self.processor):
                    out = self.model.generate(**inputs, **settings)
                stats = self.pruner.stats
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = [cut(text, until).strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]
        counts = (new != self.pad_token_id).sum(1).tolist()
        return texts, counts, stats

    def generation_settings(self, gen_kwargs: dict) -> dict:
        settings = {"max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
                    "pad_token_id": self.pad_token_id, "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        settings["do_sample"] = sample
        if sample:
            settings["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        return settings

    def record(self, args: list[tuple], stats: dict) -> None:
        if self.stats_out is None:
            return
        line = {"task": [a[4] for a in args], "doc_ids": [a[3] for a in args], "method": self.method,
                "kept": final_kept(stats) if self.pruner is not None else None, "stats": stats}
        with self.stats_out.open("a") as handle:
            handle.write(json.dumps(line) + "\n")  # stats are JSON by the method contract


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the task's stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def placeholder_stats(adapter, inputs: dict) -> dict:
    """Stats of the unpruned model in the pruner's format: every media placeholder of a sample is one token that
    reaches every layer."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    media = sum((ids == adapter.token_id(m)) for m in adapter.modalities) & real
    return {"method": "none", "selection_ms": 0.0,
            "samples": [dict.fromkeys(TOKEN_COLUMNS, int(n)) for n in media.sum(1).tolist()]}


def token_accounting(stats: dict) -> list[dict]:
    """Per sample: visual tokens before, into the LLM, at the last layer, layer-averaged, and its share of the
    batch's selection time."""
    samples = stats["samples"]
    share = stats["selection_ms"] / max(len(samples), 1)
    rows = []
    for sample in samples:
        into_llm = sample.get("visual_tokens_llm_input", (sample.get("tokens_per_layer") or [None])[0])
        rows.append({"visual_tokens_before": sample["visual_tokens_before"], "visual_tokens_llm_input": into_llm,
                     "visual_tokens_after": sample["visual_tokens_after"],
                     "equivalent_tokens": float(sample["equivalent_tokens"]), "selection_ms": share})
    return rows


def summary(rows: list[dict]) -> dict:
    """Means over samples, named for lmms-eval's throughput table (it prefixes ``avg_``)."""
    return {f"mmprune_{key}": sum(float(r[key]) for r in rows) / len(rows) for key in rows[0]}
