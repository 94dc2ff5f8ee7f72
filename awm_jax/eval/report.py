"""Reports: ``report.json``, a before/after summary table, and the per-epoch plot."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from awm_jax.machine import describe_machine
from awm_jax.plotting import save_figure
from awm_jax.serialization import library_versions, write_json_atomic

METRIC_NAMES = ("acc", "asr", "asr_all", "ra")
REPORT_KEYS = ("dataset", "model", "attack", "defense", "n_clean", "seed", "config", "before",
               "after", "seconds")


def validate_report(report: dict[str, Any]) -> None:
    """Checks the keys every ``report.json`` must have and that metrics are fractions.

    Raises:
      ValueError: a key is missing or a metric lies outside [0, 1].
    """
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise ValueError(f"report is missing keys {missing}.")
    for phase in ("before", "after"):
        for name in METRIC_NAMES:
            value = report[phase].get(name)
            if value is None or (not math.isnan(value) and not 0.0 <= value <= 1.0):
                raise ValueError(f"report[{phase!r}][{name!r}] must be a fraction; got {value}.")


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Validates and writes a ``report.json``."""
    validate_report(report)
    return write_json_atomic(path, {**report, "versions": library_versions(),
                                    "machine": describe_machine()})


def summary_table(rows: dict[str, dict[str, float]], names: Sequence[str] = METRIC_NAMES) -> str:
    """A Markdown table with one row per entry of ``rows`` and one column per metric (percent)."""
    header = "| | " + " | ".join(name.upper() for name in names) + " |"
    rule = "|---|" + "---:|" * len(names)
    lines = [header, rule]
    for label, metrics in rows.items():
        cells = " | ".join(f"{100 * metrics[name]:.2f}%" for name in names)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def plot_history(history: Sequence[dict[str, float]], path: str | os.PathLike,
                 before: dict[str, float] | None = None, after: dict[str, float] | None = None,
                 title: str = "AWM") -> Path:
    """Plots test ACC and ASR (and RA if present) over the outer epochs to a PNG.

    Args:
      history: one dict per epoch with ``epoch`` and the metrics to draw.
      path: output file.
      before: metrics of the backdoored model, drawn at epoch 0.
      after: metrics of the model the defense returned (which may be a selected or averaged
        mask rather than the last epoch's), drawn as stars to the right of the last epoch.
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [0] + [h["epoch"] for h in history] if before else [h["epoch"] for h in history]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, style in (("acc", "o-"), ("asr", "s-"), ("ra", "^--")):
        if not all(name in h for h in history):
            continue
        values = ([before[name]] if before else []) + [h[name] for h in history]
        line, = axis.plot(epochs, [100 * v for v in values], style, label=name.upper(),
                          markersize=3)
        if after is not None and history:
            axis.plot([history[-1]["epoch"] + 1], [100 * after[name]], "*",
                      color=line.get_color(), markersize=11)
    if after is not None and history:
        axis.annotate("returned\nmodel", (history[-1]["epoch"] + 1, 50), ha="center",
                      fontsize=8, color="grey")
    axis.set_xlabel("outer epoch")
    axis.set_ylabel("percent of test images")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(title)
    return save_figure(figure, path)
