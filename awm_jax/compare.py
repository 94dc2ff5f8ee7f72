"""Several defenses on the same backdoored model and the same clean images, side by side.

:func:`compare_defenses` draws the defender's clean images once (the same draw, trigger set and
defense key as :func:`awm_jax.pipeline.purify_model` with the same seed: both call
:func:`awm_jax.pipeline.draw_for_defense`, so a row equals that defense's ``purify`` report),
runs every requested defense from the ``DEFENSES`` registry on
them, and evaluates each (ACC, ASR on non-target images, ASR over all images, RA, seconds).
A defense that raises is recorded with its error and the others still run. The host writes
``compare.json``, ``compare.md`` and an ASR-vs-ACC scatter plot ``compare.png``.

A defense is named ``NAME`` (its config's defaults) or ``NAME:PRESET`` for config classes with
named presets, e.g. ``ablation:weight_mask`` (a row of the paper's Table 4), so
``anp,ablation:weight_mask,ablation:weight_mask_trigger,awm`` walks from ANP to AWM.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from awm_jax.attacks.base import Attack, create_attack
from awm_jax.checkpoint import load_model
from awm_jax.data.clean_subset import CleanDataConfig
from awm_jax.data.dataset import ImageDataset
from awm_jax.data.sources import load_dataset
from awm_jax.defenses import DEFENSES, get_defense
from awm_jax.eval.report import METRIC_NAMES
from awm_jax.machine import describe_machine
from awm_jax.pipeline import draw_for_defense
from awm_jax.plotting import save_figure
from awm_jax.serialization import library_versions, write_json_atomic

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "compare.json", "compare.md", "compare.png"
NONE_LABEL = "none"


class DefenseSpec(NamedTuple):
    """One column of a comparison: a table label, a registered defense and its config."""

    label: str
    name: str
    config: Any


def resolve_defenses(entries: Sequence[str | DefenseSpec],
                     overrides: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> list[DefenseSpec]:
    """Turns ``NAME`` / ``NAME:PRESET`` strings into :class:`DefenseSpec`s.

    Args:
      entries: defense names (``NAME`` or ``NAME:PRESET``) or ready specs.
      overrides: ``{NAME: {field: value}}`` applied to every entry of defense ``NAME``.

    Raises:
      ValueError: no entries, an unknown defense (the message lists the known ones), an
        unknown preset, a repeated label, overrides for a defense that is not compared, or an
        invalid setting.
    """
    if not entries:
        raise ValueError(f"no defenses to compare; known: {', '.join(DEFENSES.names())}.")
    overrides = dict(overrides or {})
    specs = []
    for entry in entries:
        if isinstance(entry, DefenseSpec):
            get_defense(entry.name)
            specs.append(entry)
            continue
        name, _, preset = entry.strip().partition(":")
        cls = get_defense(name).config_class
        if preset and not hasattr(cls, "preset"):
            raise ValueError(f"defense {name!r} has no presets; got {entry!r}.")
        base = cls.preset(preset) if preset else cls()
        specs.append(DefenseSpec(entry.strip(), name,
                                 dataclasses.replace(base, **overrides.get(name, {}))))
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1 or
                       label == NONE_LABEL})
    if repeated:
        raise ValueError(f"defense labels must be unique and not {NONE_LABEL!r}; got "
                         f"{repeated}.")
    unused = sorted(set(overrides) - {spec.name for spec in specs})
    if unused:
        raise ValueError(f"settings were given for {unused}, which are not compared "
                         f"(compared: {', '.join(labels)}).")
    return specs


def compare_defenses(model, variables, dataset: ImageDataset, attack: Attack,
                     defenses: Sequence[str | DefenseSpec], *,
                     overrides: Mapping[str, Mapping[str, Any]] | None = None,
                     model_name: str = "", clean: CleanDataConfig = CleanDataConfig(),
                     seed: int = 0, out_dir: str | os.PathLike | None = None,
                     progress: bool = True, extra: dict[str, Any] | None = None,
                     workdir: str | os.PathLike | None = None, checkpoint_every: int = 1,
                     resume: bool = False) -> dict[str, Any]:
    """Runs every defense on one clean draw and evaluates each on one evaluation set.

    Args:
      model, variables: the backdoored model.
      dataset: its dataset (the defender's images come from the test split, the rest of it is
        the evaluation set).
      attack: the attack the model carries.
      defenses: ``NAME`` / ``NAME:PRESET`` strings or :class:`DefenseSpec`s
        (see :func:`resolve_defenses`).
      overrides: ``{NAME: {field: value}}`` for the defenses' configs.
      model_name: for the report.
      clean: how the defender's clean images are drawn (once, for all defenses).
      seed: root seed of the clean draw, the trigger and every defense's key.
      out_dir: if given, writes ``compare.json``, ``compare.md`` and ``compare.png`` there.
      progress: show the defenses' progress bars.
      extra: more entries for the report.
      workdir: if given, every defense checkpoints its run in its own subdirectory
        :func:`defense_workdir` of it (see :mod:`awm_jax.defenses.checkpointing`).
      checkpoint_every: the defenses' steps between checkpoints.
      resume: continue every defense from its newest checkpoint (a finished one only
        reports; one without checkpoints starts fresh).

    Returns:
      ``{"rows": [...], "failed": [...], ...}``; each row has ``label, defense, config,
      acc, asr, asr_all, ra, seconds, error`` (metrics None and ``error`` set when the defense
      raised) and, for a defense that finished, its result's ``details``; the first row,
      ``none``, is the backdoored model.

    Raises:
      ValueError: bad defense names or settings, or ``resume`` without ``workdir`` (before
        any defense runs).
    """
    specs = resolve_defenses(defenses, overrides)
    if resume and workdir is None:
        raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
    clean_split, eval_split, evaluate, defense_key = draw_for_defense(model, dataset, attack,
                                                                      clean, seed)
    rows = [{"label": NONE_LABEL, "defense": NONE_LABEL, "config": None,
             **evaluate(variables), "seconds": 0.0, "error": None}]
    for spec in specs:
        checkpoints = {} if workdir is None else {
            "workdir": defense_workdir(workdir, spec.label),
            "checkpoint_every": checkpoint_every, "resume": resume}
        rows.append(_run_one(spec, model, variables, clean_split, defense_key,
                             dataset.num_classes, evaluate, progress, checkpoints))
    report = {"dataset": dataset.name, "model": model_name, "attack": attack.name,
              "attack_params": dict(attack.params), "n_clean": len(clean_split),
              "clean_data": clean.to_dict(), "seed": seed, "eval_size": len(eval_split),
              "rows": rows, "failed": [r["label"] for r in rows if r["error"]],
              **(extra or {})}
    if out_dir is not None:
        write_outputs(report, out_dir)
    return report


def defense_workdir(workdir: str | os.PathLike, label: str) -> Path:
    """The checkpoint directory of the defense labelled ``label`` under ``workdir``
    (``NAME:PRESET`` becomes ``NAME-PRESET``)."""
    return Path(workdir) / label.replace(":", "-").replace(os.sep, "_")


def _run_one(spec: DefenseSpec, model, variables, clean_split, key, num_classes, evaluate,
             progress: bool, checkpoints: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    row = {"label": spec.label, "defense": spec.name, "config": _config_dict(spec.config)}
    try:
        result = get_defense(spec.name).purify(model, variables, clean_split, key, spec.config,
                                               num_classes=num_classes, progress=progress,
                                               **checkpoints)
        metrics = evaluate(result.variables)
    except Exception as error:  # noqa: BLE001  (one failing defense must not lose the rest)
        return {**row, **{name: None for name in METRIC_NAMES},
                "seconds": time.perf_counter() - start,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=-8)}
    # details: what the defense decided (NC's flagged classes, FP's pruned channels, ...).
    return {**row, **metrics, "seconds": result.seconds, "error": None,
            "details": result.details}


def _config_dict(config) -> dict[str, Any] | None:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def markdown_table(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table (metrics in percent; errors in the last column)."""
    header = ("| defense | " + " | ".join(n.upper() if n != "asr_all" else "ASR (all)"
                                          for n in METRIC_NAMES) + " | seconds | error |")
    lines = [header, "|---|" + "---:|" * (len(METRIC_NAMES) + 1) + "---|"]
    for row in report["rows"]:
        cells = [("-" if row[n] is None or math.isnan(row[n]) else f"{100 * row[n]:.2f}")
                 for n in METRIC_NAMES]
        error = (row["error"] or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['label']} | " + " | ".join(cells) +
                     f" | {row['seconds']:.1f} | {error} |")
    return "\n".join(lines)


def describe(report: dict[str, Any]) -> str:
    """A title line and the Markdown table, as the CLI prints them."""
    return (f"{len(report['rows']) - 1} defenses on {report['dataset']} / {report['model']} / "
            f"{report['attack']} with {report['n_clean']} clean images (seed "
            f"{report['seed']}), evaluated on {report['eval_size']} test images; metrics in "
            f"percent\n\n{markdown_table(report)}")


def plot_scatter(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """ASR (non-target) against ACC, one labelled point per defense that finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for row in report["rows"]:
        if row["error"] or row["acc"] is None:
            continue
        point = (100 * row["acc"], 100 * row["asr"])
        axis.scatter(*point, marker="x" if row["label"] == NONE_LABEL else "o", s=40)
        axis.annotate(row["label"], point, textcoords="offset points", xytext=(5, 4),
                      fontsize=8)
    axis.set_xlabel("clean accuracy ACC (%)")
    axis.set_ylabel("attack success rate ASR (%, non-target images)")
    axis.set_ylim(-3, 103)
    axis.grid(alpha=0.3)
    axis.set_title(f"{report['dataset']} / {report['attack']}, {report['n_clean']} clean images"
                   " (best: bottom right)", fontsize=9)
    return save_figure(figure, path)


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Writes ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out_dir / JSON_NAME, {**report, "versions": library_versions(),
                                                         "machine": describe_machine()})
    markdown = out_dir / MARKDOWN_NAME
    markdown.write_text(describe(report) + "\n")
    return [json_path, markdown, plot_scatter(report, out_dir / PLOT_NAME)]


def compare_checkpoint(checkpoint: str | os.PathLike, defenses: Sequence[str | DefenseSpec],
                       *, dataset_source: str | None = None, **kwargs) -> dict[str, Any]:
    """:func:`compare_defenses` on a model saved by ``train-backdoor`` (dataset and attack from
    its ``metadata.json``, unless ``dataset_source`` overrides the dataset). Defense names are
    checked before the model is loaded."""
    resolve_defenses(defenses, kwargs.get("overrides"))
    model, variables, dataset, attack, metadata = load_backdoored(checkpoint, dataset_source)
    return compare_defenses(model, variables, dataset, attack, defenses,
                            model_name=metadata["model"]["name"],
                            extra={"checkpoint": str(checkpoint)}, **kwargs)


def load_backdoored(checkpoint: str | os.PathLike, dataset_source: str | None = None
                    ) -> tuple[Any, Any, ImageDataset, Attack, dict[str, Any]]:
    """A ``train-backdoor`` model with its dataset and attack, as ``awm-jax compare`` loads it.

    Returns:
      ``(model, variables, dataset, attack, metadata)``; the dataset is the one named in
      ``metadata.json`` unless ``dataset_source`` overrides it.

    Raises:
      ValueError: no readable model in ``checkpoint``, or the dataset cannot be loaded.
    """
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(dataset_source or metadata["dataset"]["name"])
    attack = create_attack(metadata["attack"]["name"], **metadata["attack"]["params"])
    return model, variables, dataset, attack, metadata
