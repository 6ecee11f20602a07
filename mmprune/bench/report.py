"""Write a sweep's rows: ``results.json``, ``results.csv``, ``results.md`` and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = ["method", "keep", "status", "accuracy", "retention", "visual_tokens_llm_input", "visual_tokens_after",
           "equivalent_tokens", "flops_prefill", "flops_speedup", "prefill_ms", "prefill_speedup", "e2e_ms",
           "e2e_speedup", "timing_noisy", "kv_bytes", "selection_share", "stability", "recall"]


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
    paths.update(plots(rows, out, config.get("family_counts", {})))
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
    lines = [f"Data: {config.get('data')}, {config.get('questions')} questions (answered in batches of "
             f"{config.get('batch')}); model {config.get('model')}; FLOPs = 2 x multiply-accumulates; latency: median "
             f"of {config.get('reps')} interleaved runs on a batch of {config.get('timing_batch')} prompts. Speedups "
             f"marked * are flagged as noise (see the notes) and left out of the plots.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    notes = []
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | {row['keep']} | {row['status']} |" + " |" * 10)
            continue
        noisy = "*" if row.get("timing_noisy") else ""
        if noisy:
            notes.append(f"* {row['method']} keep={row['keep']:g}: {row['timing_noisy']}")
        lines.append(" | ".join([
            f"| {row['method']}{' (baseline)' if row.get('baseline') and row['method'] != 'none' else ''}",
            _fmt(row["keep"], "{:g}"),
            _fmt(100 * row["accuracy"], "{:.1f}"),
            _fmt(100 * row.get("retention", math.nan), "{:.1f}"),
            _fmt(row["visual_tokens_llm_input"], "{:.0f}"),
            _fmt(row["equivalent_tokens"], "{:.1f}"),
            _fmt(row.get("flops_speedup"), "{:.2f}x"),
            _fmt(row["prefill_speedup"], "{:.2f}x" + noisy),
            _fmt(row["e2e_speedup"], "{:.2f}x" + noisy),
            _fmt(row["kv_bytes"] / 2**20, "{:.2f}"),
            _fmt(100 * row["selection_share"], "{:.1f}"),
            _fmt(row["stability"], "{:.3f}"),
            _fmt(None if row.get("recall") is None else 100 * row["recall"], "{:.1f}"),
        ]) + " |")
    if notes:
        lines += ["", "Timings flagged as noise:", "", *notes]
    families = families_of(rows)
    counts = config.get("family_counts", {})
    if families:
        lines += ["", "Per-family accuracy (%; questions per family: "
                  + ", ".join(f"{f} {counts.get(f, '?')}" for f in families) + "):", "",
                  "| method | keep | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
        for row in rows:
            if row["status"] == "ok":
                lines.append(f"| {row['method']} | {row['keep']:g} | "
                             + " | ".join(_fmt(100 * row["families"].get(f, math.nan), "{:.1f}") for f in families)
                             + " |")
    return "\n".join(lines)


def plots(rows: list[dict], out: Path, family_counts: dict | None = None) -> dict[str, Path]:
    """Retention vs kept tokens (baselines dashed), measured and FLOPs-predicted speedup vs kept tokens (timings
    flagged as noise left out; the axis follows the plausible values), per-family retention at the smallest budget
    (methods that failed there left out and named; questions per family on the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["method"] != "none"]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    # one colour and marker per method across the three plots; tab20, then every other tab20b colour, keep 30 methods
    # apart (the default cycle, 10)
    palette = list(plt.cm.tab20.colors) + list(plt.cm.tab20b.colors)[::2]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    marker = {m: "os^vDP*Xph<>"[i % 12] for i, m in enumerate(methods)}
    tokens_axis = "visual tokens (equivalent average over layers)"

    def finish(fig, ax, name: str, ylabel: str, xlabel: str | None = tokens_axis) -> Path:
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        handles = ax.get_legend_handles_labels()[0]
        if handles:  # beside the axes (a dozen methods would cover the points), a column per 16 entries
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncols=-(-len(handles) // 16))
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
    series, top = speedup_series(ok)
    for method, (measured, predicted) in series.items():
        if measured:
            ax.plot(*zip(*measured), "-", marker=marker[method], color=colour[method], label=method)
        ax.plot(*zip(*predicted), ":", color=colour[method])
    if top:
        ax.set_ylim(0, top)
    dropped = sum(1 for r in ok if r.get("timing_noisy"))
    if dropped:
        ax.set_title(f"{dropped} timing(s) flagged as noise left out (results.md says why)", fontsize=8)
    paths["plot_speedup"] = finish(fig, ax, "speedup_vs_tokens.png",
                                   "prefill speedup (solid: measured, dotted: FLOPs)")

    paths["plot_families"] = family_plot(rows, ok, methods, colour, family_counts or {}, plt, finish)
    return paths


def speedup_series(ok: list[dict]) -> tuple[dict, float | None]:
    """Per method: (measured points without the timings flagged as noise, FLOPs-predicted points), sorted by
    tokens; and the y-axis top that holds every plotted value (so an implausible outlier cannot squash the rest)."""
    series, values = {}, []
    for method in dict.fromkeys(r["method"] for r in ok):
        rows = sorted((r for r in ok if r["method"] == method), key=lambda r: r["equivalent_tokens"])
        measured = [(r["equivalent_tokens"], r["prefill_speedup"]) for r in rows if not r.get("timing_noisy")]
        predicted = [(r["equivalent_tokens"], r["flops_speedup"]) for r in rows]
        series[method] = (measured, predicted)
        values += [v for _, v in measured + predicted]
    return series, (1.15 * max(values) if values else None)


def family_budget(rows: list[dict]) -> tuple[object, dict, list[str]]:
    """The budget of the per-family plot (the sweep's smallest: fewest tokens on average over its successful rows),
    the successful rows at it by method, and the methods that failed at it (left out, named)."""
    ok = [r for r in rows if r["status"] == "ok" and r["method"] != "none"]
    keeps = list(dict.fromkeys(r["keep"] for r in rows if r["method"] != "none"))

    def mean_tokens(keep):
        values = [r["equivalent_tokens"] for r in ok if r["keep"] == keep]
        return sum(values) / len(values) if values else float("inf")

    target = min(keeps, key=mean_tokens) if keeps else None
    at_target = {r["method"]: r for r in ok if r["keep"] == target}
    missing = [r["method"] for r in rows if r["keep"] == target and r["status"] != "ok"]
    return target, at_target, missing


def family_plot(rows, ok, methods, colour, family_counts: dict, plt, finish) -> Path:
    """Per-family retention of every method at one budget, the sweep's smallest (fewest tokens on average):
    a method that failed there is left out and named, not shown at another budget."""
    target, at_target, missing = family_budget(rows)
    shown = [m for m in methods if m in at_target]
    families = families_of(ok)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(families) + 2), 4.2))
    width = 0.8 / max(1, len(shown))
    for i, method in enumerate(shown):
        values = [100 * at_target[method]["family_retention"].get(f, math.nan) for f in families]
        ax.bar([j + i * width for j in range(len(families))], values, width, color=colour[method], label=method)
    labels = [f"{f}\n(n={family_counts[f]})" if f in family_counts else f for f in families]
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], labels, rotation=20, fontsize=8)
    title = f"keep={target:g}" if target is not None else "no budget"
    if missing:
        title += f"; left out (failed at this budget): {', '.join(missing)}"
    few = [f for f in families if family_counts.get(f, 0) < 30]
    if few:
        title += f"; fewer than 30 questions in {', '.join(few)}: noisy"
    ax.set_title(title, fontsize=8)
    return finish(fig, ax, "family_retention.png", "accuracy retained (%)", xlabel=None)
