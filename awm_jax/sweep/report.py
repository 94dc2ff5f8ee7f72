"""Sweep tables and plots: ``sweep.json``/``sweep.csv`` rows, ASR/ACC heatmaps, a Pareto plot.

One row per member: its index, seed, swept hyperparameters and after-defense metrics (plus the
undefended model's metrics for its seed). The host writes them; nothing here touches JAX.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from awm_jax.plotting import save_figure
from awm_jax.serialization import write_json_atomic

TABLE_JSON = "sweep.json"
TABLE_CSV = "sweep.csv"
HEATMAP_PNG = "heatmap.png"
PARETO_PNG = "pareto.png"


def write_table(out_dir: str | os.PathLike, rows: Sequence[dict[str, Any]],
                meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Writes ``sweep.json`` (``{"rows": rows, **meta}``) and ``sweep.csv`` (the rows)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out_dir / TABLE_JSON, {**(meta or {}), "rows": list(rows)})
    columns = list(dict.fromkeys(name for row in rows for name in row))
    csv_path = out_dir / TABLE_CSV
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(json_path), csv_path


def seed_means(rows: Sequence[dict], axes: Sequence[str], metric: str
               ) -> tuple[list[list], np.ndarray]:
    """Mean of ``metric`` over seeds (and unlisted swept names) on the grid of ``axes``.

    Returns:
      ``(values, table)``: the sorted distinct values of each axis and ``float[len(v0),
      len(v1), ...]`` means (NaN where no row falls).
    """
    values = [sorted({row[a] for row in rows}) for a in axes]
    total = np.zeros([len(v) for v in values])
    count = np.zeros_like(total)
    for row in rows:
        index = tuple(v.index(row[a]) for v, a in zip(values, axes))
        total[index] += row[metric]
        count[index] += 1
    with np.errstate(invalid="ignore"):
        return values, total / count


def pareto_front(acc: Sequence[float], asr: Sequence[float]) -> list[int]:
    """Indices of points no other point beats (ACC at least as high and ASR at least as low,
    one strictly), sorted by ASR."""
    acc, asr = np.asarray(acc, float), np.asarray(asr, float)
    front = [i for i in range(len(acc))
             if not np.any((acc >= acc[i]) & (asr <= asr[i]) & ((acc > acc[i]) | (asr < asr[i])))]
    return sorted(front, key=lambda i: (asr[i], -acc[i]))


def plot_heatmaps(rows: Sequence[dict], axes: Sequence[str], path: str | os.PathLike,
                  metrics: Sequence[str] = ("asr", "acc"), defense: str = "AWM") -> Path:
    """One heatmap per metric over the first two swept ``axes`` (mean over seeds and others),
    titled with the ``defense`` name.

    With one swept axis the heatmap has a single row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = list(axes)[:2]
    fig, panels = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for panel, metric in zip(panels[0], metrics):
        values, table = seed_means(rows, axes, metric)
        if len(axes) == 1:
            values, table = [[""]] + values, table[None, :]
            axes_shown = ["", axes[0]]
        else:
            axes_shown = axes
        image = panel.imshow(table, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                             origin="lower")
        panel.set_xticks(range(len(values[1])), [f"{v:g}" for v in values[1]])
        panel.set_yticks(range(len(values[0])), [f"{v:g}" if v != "" else "" for v in values[0]])
        panel.set_xlabel(axes_shown[1])
        panel.set_ylabel(axes_shown[0])
        panel.set_title(f"{metric.upper()} after {defense} (mean over seeds)")
        for (i, j), value in np.ndenumerate(table):
            panel.text(j, i, f"{value:.2f}", ha="center", va="center",
                       color="white" if value < 0.5 else "black", fontsize=8)
        fig.colorbar(image, ax=panel)
    return save_figure(fig, path)


def plot_pareto(rows: Sequence[dict], path: str | os.PathLike,
                label_names: Sequence[str] = (), defense: str = "AWM") -> Path:
    """ASR vs ACC of every member, the Pareto front (high ACC, low ASR) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [row["acc"] for row in rows]
    asr = [row["asr"] for row in rows]
    front = pareto_front(acc, asr)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(asr, acc, s=18, alpha=0.7, label="members")
    ax.plot([asr[i] for i in front], [acc[i] for i in front], "r-o", ms=5, label="Pareto front")
    for i in front:
        text = ", ".join(f"{n}={rows[i][n]:g}" for n in label_names if n in rows[i])
        if text:
            ax.annotate(text, (asr[i], acc[i]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("ASR (lower is better)")
    ax.set_ylabel("ACC (higher is better)")
    ax.set_title(f"{defense} sweep: ASR vs ACC")
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)
