"""Tables and plots of the reproduction study from its cell and sweep JSON files.

Pure host code (no JAX): :func:`aggregate` turns cells (one ``compare_defenses`` report per
attack, budget and seed) into mean / std / min / max over seeds; :func:`table_markdown` and
:func:`plot_table` render them; :func:`aggregate_sweep`, :func:`figure_markdown` and
:func:`plot_figure` do the same for Figure D's sweeps. The spread is the sample standard
deviation (``ddof=1``); with one seed it is ``None`` and only the mean is shown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from awm_jax.plotting import save_figure

METRICS = ("acc", "asr", "asr_all", "ra")
HEADERS = {"acc": "ACC", "asr": "ASR", "asr_all": "ASR (all)", "ra": "RA"}
NONE_LABEL = "none"


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"n", "mean", "std", "min", "max"}`` of the finite values (``None`` and NaN skipped);
    ``std`` is the sample standard deviation, ``None`` below two values; all ``None`` when no
    value is finite."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(finite), "max": max(finite)}


def raw_rows(cells: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per (cell, defense label in ``labels``); a label missing from a cell's
    report gives a row with ``error="missing from the cell"``. ``cell_seconds`` is the whole
    cell's wall time (every defense, evaluations, the clean draw); ``machine`` where the
    defense ran (None in cells written before rows recorded it)."""
    rows = []
    for cell in cells:
        by_label = {row["label"]: row for row in cell["rows"]}
        for label in labels:
            row = by_label.get(label, {"defense": label.partition(":")[0], "seconds": None,
                                       "error": "missing from the cell"})
            rows.append({"dataset": cell["dataset"], "attack": cell["attack"],
                         "budget": cell["budget"], "seed": cell["seed"], "label": label,
                         "defense": row.get("defense"),
                         **{m: row.get(m) for m in METRICS}, "seconds": row.get("seconds"),
                         "cell_seconds": cell.get("wall_seconds"), "error": row.get("error"),
                         "machine": row.get("machine")})
    return rows


def aggregate(rows: Sequence[Mapping[str, Any]], budgets: Sequence[str],
              attacks: Sequence[str], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and spread over seeds of every (budget, attack, defense label), in that order.

    Rows of a defense that raised count in ``errors`` (``"seed S: message"``) and not in the
    statistics; a group without rows is left out.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["budget"], row["attack"], row["label"]), []).append(row)
    out = []
    for budget in budgets:
        for attack in attacks:
            for label in labels:
                group = sorted(groups.get((budget, attack, label), []), key=lambda r: r["seed"])
                if not group:
                    continue
                ok = [r for r in group if not r["error"]]
                out.append({"budget": budget, "attack": attack, "label": label,
                            "seeds": [r["seed"] for r in ok],
                            **{m: summarize(r[m] for r in ok) for m in METRICS},
                            "seconds": summarize(r["seconds"] for r in ok),
                            "cell_seconds": summarize(r.get("cell_seconds") for r in group),
                            "errors": [f"seed {r['seed']}: {r['error']}" for r in group
                                       if r["error"]]})
    return out


def _percent(stats: Mapping[str, Any]) -> str:
    if stats["mean"] is None:
        return "-"
    text = f"{100 * stats['mean']:.2f}"
    return text if stats["std"] is None else f"{text} ± {100 * stats['std']:.2f}"


def table_markdown(title: str, aggregates: Sequence[Mapping[str, Any]],
                   budgets: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """One Markdown table per budget (``budgets``: name -> description): rows attack x
    defense, metrics as mean ± std in percent over ``n`` seeds, the defense's seconds and (on
    the ``none`` row) the whole cell's seconds, means over seeds, and errors."""
    lines = [f"# {title}", "", *notes, ""] if notes else [f"# {title}", ""]
    for budget, description in budgets.items():
        rows = [a for a in aggregates if a["budget"] == budget]
        lines += [f"## {budget}: {description}", ""]
        if not rows:
            lines += ["(no finished cells)", ""]
            continue
        lines.append("| attack | defense | " + " | ".join(HEADERS[m] for m in METRICS) +
                     " | n | seconds | cell seconds | errors |")
        lines.append("|---|---|" + "---:|" * (len(METRICS) + 3) + "---|")
        for row in rows:
            seconds = row["seconds"]["mean"]
            cell = row["cell_seconds"]["mean"] if row["label"] == NONE_LABEL else None
            errors = "; ".join(row["errors"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['attack']} | {row['label']} | " +
                         " | ".join(_percent(row[m]) for m in METRICS) +
                         f" | {row['acc']['n']} | " +
                         ("-" if seconds is None else f"{seconds:.1f}") + " | " +
                         ("" if cell is None else f"{cell:.1f}") + f" | {errors[:300]} |")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_table(aggregates: Sequence[Mapping[str, Any]], budgets: Sequence[str],
               labels: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    """ASR against ACC, one panel per budget, one colour per defense, one point per attack
    (mean over seeds, bars: std)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.5),
                                squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, budget in zip(axes[0], budgets):
        for index, label in enumerate(labels):
            rows = [a for a in aggregates if a["budget"] == budget and a["label"] == label
                    and a["acc"]["mean"] is not None]
            if not rows:
                continue
            x = [100 * r["acc"]["mean"] for r in rows]
            y = [100 * r["asr"]["mean"] for r in rows]
            xerr = [100 * (r["acc"]["std"] or 0.0) for r in rows]
            yerr = [100 * (r["asr"]["std"] or 0.0) for r in rows]
            axis.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="x" if label == NONE_LABEL else "o",
                          color=colours(index % 10), label=label, ms=5, capsize=2, alpha=0.8)
        axis.set_title(f"{title}: {budget}", fontsize=9)
        axis.set_xlabel("clean accuracy ACC (%)")
        axis.set_ylabel("ASR (%, non-target images)")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    return save_figure(figure, path, dpi=110)


def aggregate_sweep(table: Mapping[str, Any], hparam: str) -> list[dict[str, Any]]:
    """Mean and spread over seeds of every value of ``hparam`` in a sweep table
    (:func:`awm_jax.sweep.job.sweep_model`'s rows), in increasing value order."""
    values = sorted({float(row[hparam]) for row in table["rows"]})
    out = []
    for value in values:
        rows = [row for row in table["rows"] if math.isclose(float(row[hparam]), value,
                                                              rel_tol=1e-6, abs_tol=0.0)]
        out.append({"value": value, "seeds": sorted(row["seed"] for row in rows),
                    **{m: summarize(row[m] for row in rows) for m in METRICS},
                    **{f"before_{m}": summarize(row[f"before_{m}"] for row in rows)
                       for m in METRICS}})
    return out


def figure_markdown(title: str, points: Mapping[str, Sequence[Mapping[str, Any]]],
                    defaults: Mapping[str, float], notes: Sequence[str] = ()) -> str:
    """One Markdown table per hyperparameter: the backdoored model (``before``), then its
    values (the base config's value marked "default"), metrics as mean ± std in percent and the seeds."""
    lines = [f"# {title}", "", *notes, ""] if notes else [f"# {title}", ""]
    for hparam, rows in points.items():
        lines += [f"## {hparam} (the others at the base config's values)", "",
                  f"| {hparam} | " + " | ".join(HEADERS[m] for m in METRICS) + " | n |",
                  "|---:|" + "---:|" * (len(METRICS) + 1)]
        if rows:
            lines.append("| before | " + " | ".join(_percent(rows[0][f"before_{m}"])
                                                    for m in METRICS) +
                         f" | {rows[0]['before_acc']['n']} |")
        for row in rows:
            mark = " (default)" if math.isclose(row["value"], defaults.get(hparam, math.nan),
                                                 rel_tol=1e-9) else ""
            lines.append(f"| {row['value']:g}{mark} | " +
                         " | ".join(_percent(row[m]) for m in METRICS) +
                         f" | {row['acc']['n']} |")
        lines.append("")
    return "\n".join(lines)


def plot_figure(points: Mapping[str, Sequence[Mapping[str, Any]]], defaults: Mapping[str, float],
                log_x: Sequence[str], path: str | os.PathLike, title: str) -> Path:
    """ACC and ASR against each hyperparameter: mean with std bars and a min-max band; log x
    for ``log_x`` (symlog when a value is 0); the default value dashed, the backdoored model's
    ACC and ASR dotted."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.8),
                                squeeze=False)
    for axis, (hparam, rows) in zip(axes[0], points.items()):
        x = [row["value"] for row in rows]
        for metric, colour in (("acc", "tab:blue"), ("asr", "tab:red")):
            mean = [100 * _or_nan(row[metric]["mean"]) for row in rows]
            std = [100 * _or_nan(row[metric]["std"], 0.0) for row in rows]
            axis.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, color=colour,
                          label=HEADERS[metric])
            axis.fill_between(x, [100 * _or_nan(row[metric]["min"]) for row in rows],
                              [100 * _or_nan(row[metric]["max"]) for row in rows],
                              color=colour, alpha=0.15, linewidth=0)
            before = rows[0][f"before_{metric}"]["mean"] if rows else None
            if before is not None:
                axis.axhline(100 * before, color=colour, linestyle=":", linewidth=1)
        if hparam in log_x:
            positive = [v for v in x if v > 0]
            if len(positive) < len(x) and positive:
                axis.set_xscale("symlog", linthresh=min(positive))
                if min(x) == 0:  # no empty negative half on a non-negative axis
                    axis.set_xlim(-0.3 * min(positive), 2 * max(positive))
            elif positive:
                axis.set_xscale("log")
        if hparam in defaults and min(x) <= defaults[hparam] <= max(x):
            axis.axvline(defaults[hparam], color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel(hparam)
        axis.set_ylabel("%")
        axis.set_ylim(-3, 103)
        axis.grid(alpha=0.3)
        axis.set_title(f"{title}: {hparam}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    return save_figure(figure, path, dpi=110)


def _or_nan(value: float | None, fallback: float = math.nan) -> float:
    return fallback if value is None else value
