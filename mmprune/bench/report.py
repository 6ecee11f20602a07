"""Write a sweep's rows: ``results.json``, ``results.csv``, ``results.md`` and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = ["method", "keep", "status", "accuracy", "retention", "visual_tokens_llm_input", "visual_tokens_after",
           "equivalent_tokens", "flops_prefill", "flops_speedup", "prefill_ms", "prefill_speedup", "e2e_ms",
           "e2e_speedup", "kv_bytes", "selection_share", "stability", "recall"]


def families_of(rows: list[dict]) -> list[str]:
    return sorted({f for row in rows for f in row.get("families", {})})


def write_results(rows: list[dict], out: str | Path, config: dict) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md"}
    paths["json"].write_text(json.dumps({"config": config, "rows": rows}, indent=1, default=str) + "\n")
    families = families_of(rows)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS + [f"accuracy:{fam}" for fam in families])
        for row in rows:
            writer.writerow([str(row[c]) if c == "keep" else _cell(row.get(c)) for c in COLUMNS]
                            + [_cell(row.get("families", {}).get(fam)) for fam in families])
    paths["md"].write_text(markdown(rows, config) + "\n")
    paths.update(plots(rows, out))
    return paths


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def markdown(rows: list[dict], config: dict) -> str:
    head = ("| method | keep | acc % | retention % | tokens into LLM | T_eq | FLOPs speedup | prefill speedup | "
            "e2e speedup | KV MiB | selection % | stability | recall % |")
    lines = [f"Data: {config.get('data')}, {config.get('questions')} questions; model {config.get('model')}; "
             f"FLOPs = 2 x multiply-accumulates; latency: median of {config.get('reps')} interleaved runs, "
             f"batch {config.get('timing_samples')}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | {row['keep']} | {row['status']} |" + " |" * 10)
            continue
        lines.append(" | ".join([
            f"| {row['method']}{' (baseline)' if row.get('baseline') and row['method'] != 'none' else ''}",
            _fmt(row["keep"], "{:g}"),
            _fmt(100 * row["accuracy"], "{:.1f}"),
            _fmt(100 * row.get("retention", math.nan), "{:.1f}"),
            _fmt(row["visual_tokens_llm_input"], "{:.0f}"),
            _fmt(row["equivalent_tokens"], "{:.1f}"),
            _fmt(row.get("flops_speedup"), "{:.2f}x"),
            _fmt(row["prefill_speedup"], "{:.2f}x"),
            _fmt(row["e2e_speedup"], "{:.2f}x"),
            _fmt(row["kv_bytes"] / 2**20, "{:.2f}"),
            _fmt(100 * row["selection_share"], "{:.1f}"),
            _fmt(row["stability"], "{:.3f}"),
            _fmt(None if row.get("recall") is None else 100 * row["recall"], "{:.1f}"),
        ]) + " |")
    families = families_of(rows)
    if families:
        lines += ["", "Per-family accuracy (%):", "", "| method | keep | " + " | ".join(families) + " |",
                  "|---|---|" + "---|" * len(families)]
        for row in rows:
            if row["status"] == "ok":
                lines.append(f"| {row['method']} | {row['keep']:g} | "
                             + " | ".join(_fmt(100 * row["families"].get(f, math.nan), "{:.1f}") for f in families)
                             + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> dict[str, Path]:
    """Retention vs kept tokens (baselines dashed), measured and FLOPs-predicted speedup vs kept tokens,
    per-family retention at the smallest budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["method"] != "none"]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    # one colour and marker per method across the three plots; tab20 keeps 20 methods apart (the default cycle, 10)
    colour = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    marker = {m: "os^vDP*Xph<>"[i % 12] for i, m in enumerate(methods)}
    tokens_axis = "visual tokens (equivalent average over layers)"

    def finish(fig, ax, name: str, ylabel: str, xlabel: str | None = tokens_axis) -> Path:
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:  # beside the axes: a dozen methods would cover the points
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        return out / name

    paths = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method in methods:
        points = sorted((r["equivalent_tokens"], 100 * r["retention"]) for r in ok if r["method"] == method)
        dashed = any(r.get("baseline") for r in ok if r["method"] == method)
        ax.plot(*zip(*points), "--" if dashed else "-", marker=marker[method], color=colour[method], label=method)
    ax.axhline(100, color="grey", lw=0.8)
    paths["plot_retention"] = finish(fig, ax, "retention_vs_tokens.png", "accuracy retained (%)")

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for method in methods:
        points = sorted((r["equivalent_tokens"], r["prefill_speedup"], r["flops_speedup"]) for r in ok
                        if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", marker=marker[method], color=colour[method],
                label=method)
        ax.plot([p[0] for p in points], [p[2] for p in points], ":", color=colour[method])
    paths["plot_speedup"] = finish(fig, ax, "speedup_vs_tokens.png",
                                   "prefill speedup (solid: measured, dotted: FLOPs)")

    smallest = {m: min((r for r in ok if r["method"] == m), key=lambda r: r["equivalent_tokens"]) for m in methods}
    families = families_of(ok)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(families) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [100 * smallest[method]["family_retention"].get(f, math.nan) for f in families]
        ax.bar([j + i * width for j in range(len(families))], values, width, color=colour[method], label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families, rotation=20, fontsize=8)
    paths["plot_families"] = finish(fig, ax, "family_retention.png", "accuracy retained at the smallest budget (%)",
                                    xlabel=None)
    return paths
