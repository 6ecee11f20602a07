"""An lmms-eval task built from mmprune's synthetic benchmark, written to disk so lmms-eval runs fully offline.

    python -m mmprune.integrations.lmms_eval_task TASKDIR --n 200 --seed 0
    python -m lmms_eval --model mmprune --model_args method=fastv,keep=16 \\
        --tasks mmprune_synth --include_path TASKDIR --batch_size 4 --output_path results/

``TASKDIR`` receives ``data/test.parquet`` (the questions of :func:`mmprune.data.synthetic.generate` with their
images), ``utils.py`` (the task's functions: the image, the question, the score of
:func:`mmprune.data.metrics.score`, i.e. what ``mmprune bench`` scores) and ``<name>.yaml`` (greedy, at most 4 new
tokens, metric ``exact_match``, the mean credit). lmms-eval resolves a task's ``dataset_path`` against the working
directory, not the YAML, so the YAML holds the data folder's absolute path: write the task where it will be read.
Needs ``datasets`` (an lmms-eval dependency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

UTILS = '''"""Functions of the {name} task (written by mmprune.integrations.lmms_eval_task)."""

from mmprune.data.metrics import score


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {{"exact_match": score(results[0], list(doc["answers"]), doc["metric"])}}
'''

YAML = """task: {name}
dataset_path: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0
  n: {n}
  seed: {seed}
"""


def write_task(out: str | Path, n: int = 200, seed: int = 0, name: str = "mmprune_synth") -> Path:
    """Write the task to ``out``; returns the YAML's path."""
    import datasets

    from mmprune.data.synthetic import generate

    if not name.isidentifier():
        raise ValueError(f"task name {name!r}: expected letters, digits and underscores (a Python identifier)")
    out = Path(out).resolve()
    samples = generate(n, seed)
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")), "family": datasets.Value("string"),
        "metric": datasets.Value("string"), "index": datasets.Value("int64"),
    })
    table = datasets.Dataset.from_dict({
        "image": [s.image for s in samples], "question": [s.question for s in samples],
        "answer": [s.answers[0] for s in samples], "answers": [s.answers for s in samples],
        "family": [s.family for s in samples], "metric": [s.metric for s in samples],
        "index": [s.index for s in samples],
    }, features=features)
    (out / "data").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(out / "data" / "test.parquet"))
    (out / "utils.py").write_text(UTILS.format(name=name))
    yaml = out / f"{name}.yaml"
    yaml.write_text(YAML.format(name=name, data=json.dumps(str(out / "data")), n=n, seed=seed))
    return yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmprune.integrations.lmms_eval_task",
                                     description="Write mmprune's synthetic benchmark as an offline lmms-eval task.")
    parser.add_argument("out", help="folder to write (created if missing)")
    parser.add_argument("--n", type=int, default=200, help="number of questions (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (default 0)")
    parser.add_argument("--name", default="mmprune_synth", help="task name (default mmprune_synth)")
    args = parser.parse_args(argv)
    try:
        path = write_task(args.out, args.n, args.seed, args.name)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {path} ({args.n} questions, seed {args.seed}); run it with --tasks {args.name} "
          f"--include_path {path.parent}")


if __name__ == "__main__":
    main()
