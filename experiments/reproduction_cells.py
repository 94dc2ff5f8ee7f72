"""Runs the reproduction study's cells (tables) and sweeps (Figure D) and writes their outputs.

The command line is ``experiments/reproduction.py``; this module gets its parsed
:class:`Selection`. A table cell is one :func:`awm_jax.compare.compare_defenses` call (model and
dataset loaded as ``awm-jax compare`` loads them, :func:`awm_jax.compare.load_backdoored`); a
Figure D sweep is one :func:`awm_jax.sweep.job.sweep_model` call (the ``awm-jax sweep`` path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import reproduction_report as report
from configs.reproduction import Budget, FigureConfig, TableConfig

from awm_jax.defenses.awm import AWMConfig
from awm_jax.machine import describe_machine, summarize_machine
from awm_jax.serialization import (
    json_default,
    library_versions,
    write_atomic,
    write_json_atomic,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Config fields that change speed and memory, not results: a row made with other values of
# these is still current.
SPEED_FIELDS = frozenset(AWMConfig.SPEED_FIELDS)
TrainFn = Callable[[str, list[str], str, Path, Path], None]


@dataclasses.dataclass(frozen=True)
class Selection:
    """The part of a table's config that one command runs, and where it reads and writes."""

    config: TableConfig | FigureConfig
    attacks: list[str]
    budgets: list[Budget]
    defenses: list[str]
    overrides: dict[str, dict[str, Any]]
    seeds: list[int]
    hparams: list[str]
    models_dir: Path
    workdir: Path
    out: Path
    quiet: bool
    dry_run: bool
    retry_errors: bool
    report_only: bool
    command: str

    @property
    def table_dir(self) -> Path:
        """``<out>/<table>``; Figure D at a non-default budget: ``<out>/figure_d_<budget>``."""
        if isinstance(self.config, FigureConfig) and self.budgets[0] != self.config.budget:
            return self.out / f"{self.config.name}_{self.budgets[0].name}"
        return self.out / self.config.name

    def model_dir(self, attack: str) -> Path:
        return self.models_dir / self.config.dataset / attack


def cell_name(dataset: str, attack: str, budget: str, seed: int) -> str:
    return f"{dataset}_{attack}_{budget}_seed{seed}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=json_default))


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _model_sha(model_dir: Path) -> str | None:
    metadata = _read_json(model_dir / "metadata.json")
    return None if metadata is None else metadata.get("variables_sha256")


def to_run(cell: dict[str, Any] | None, wanted: dict[str, Any], clean: dict[str, Any],
           model_sha: str | None, retry_errors: bool) -> tuple[list[str], bool]:
    """The defense labels a cell still needs, and whether its old results are void.

    Args:
      cell: the cell's JSON, or None.
      wanted: ``{label: config dict}`` of the selected defenses (JSON-normalised).
      clean: the budget's ``CleanDataConfig.to_dict()``.
      model_sha: the backdoored model's ``variables_sha256`` (None: not trained yet).
      retry_errors: rerun defenses whose row recorded an error.

    Returns:
      ``(labels, void)``: a row is current when its config equals the wanted one but for
      :data:`SPEED_FIELDS`; ``void`` when the cell exists but was made from other clean data or
      another model, so none of its rows count.
    """
    if cell is None:
        return list(wanted), False
    if _jsonable(clean) != cell.get("clean_data") or model_sha != cell.get("model_sha256"):
        return list(wanted), True
    rows = {row["label"]: row for row in cell["rows"]}
    return [label for label, config in wanted.items()
            if label not in rows or not _same_results(rows[label].get("config"), config)
            or (retry_errors and rows[label].get("error"))], False


def _same_results(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether two defense configs give the same results: equal but for :data:`SPEED_FIELDS`."""
    if old is None:
        return False
    strip = lambda config: {k: v for k, v in config.items() if k not in SPEED_FIELDS}
    return strip(old) == strip(new)


def budget_overrides(overrides: dict[str, dict[str, Any]], budget: Budget,
                     defenses: list[str]) -> dict[str, dict[str, Any]]:
    """The overrides of ``defenses`` at one budget: the table's (with the command line's,
    already merged into ``overrides``) over the budget's own, for the defenses that run."""
    running = {label.partition(":")[0] for label in defenses}
    merged = {name: dict(fields) for name, fields in budget.overrides.items() if name in running}
    for name, fields in overrides.items():
        merged[name] = {**merged.get(name, {}), **fields}
    return merged


def run_table(sel: Selection, train: TrainFn) -> bool:
    """Runs the selected cells that are not finished; returns whether a defense failed."""
    from awm_jax.compare import resolve_defenses

    config = sel.config
    specs = {b.name: resolve_defenses(sel.defenses,
                                      budget_overrides(sel.overrides, b, sel.defenses))
             for b in sel.budgets}
    wanted = {name: {s.label: _jsonable(s.config.to_dict()) for s in budget_specs}
              for name, budget_specs in specs.items()}
    cells = [(a, b, s) for a in sel.attacks for b in sel.budgets for s in sel.seeds]
    if sel.dry_run:
        _list_cells(sel, cells, wanted)
        return False
    if sel.report_only:
        return write_table(sel, cells)
    train(config.dataset, sel.attacks, config.zoo_size, sel.models_dir, sel.table_dir)
    loaded: dict[str, tuple] = {}
    for index, (attack, budget, seed) in enumerate(cells, 1):
        name = cell_name(config.dataset, attack, budget.name, seed)
        path = sel.table_dir / "cells" / f"{name}.json"
        old = _read_json(path)
        labels, void = to_run(old, wanted[budget.name], budget.clean.to_dict(),
                              _model_sha(sel.model_dir(attack)), sel.retry_errors)
        if not labels:
            print(f"[{index}/{len(cells)}] {name}: done, skipped", flush=True)
            continue
        print(f"[{index}/{len(cells)}] {name}: running {', '.join(labels)}", flush=True)
        start = time.perf_counter()
        if attack not in loaded:
            loaded = {attack: _load(sel.model_dir(attack))}  # one model in memory at a time
        cell = _run_cell(sel, loaded[attack], attack, budget, seed,
                         [s for s in specs[budget.name] if s.label in labels],
                         None if void else old,
                         sel.workdir / config.name / name, clearing=void)
        write_json_atomic(path, cell)
        failed = [r["label"] for r in cell["rows"] if r["error"] and r["label"] in labels]
        print(f"  {name}: {time.perf_counter() - start:.0f} s" +
              (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
        write_table(sel, cells)
    return write_table(sel, cells)


def _load(model_dir: Path) -> tuple:
    from awm_jax.compare import load_backdoored

    metadata = _read_json(model_dir / "metadata.json")
    return load_backdoored(model_dir, _dataset_source(metadata["dataset"]["name"]))


def _dataset_source(name: str) -> str:
    # The zoo records sources relative to the repository root (../shared/data/...).
    path = Path(name)
    return str((REPO_ROOT / path).resolve()) if not path.is_absolute() and (
        REPO_ROOT / path).exists() else name


def _run_cell(sel: Selection, loaded: tuple, attack: str, budget: Budget, seed: int, specs,
              old: dict[str, Any] | None, workdir: Path, clearing: bool) -> dict[str, Any]:
    from awm_jax.compare import compare_defenses, defense_workdir

    model, variables, dataset, attack_obj, metadata = loaded
    if clearing and workdir.exists():
        shutil.rmtree(workdir)  # checkpoints of another clean draw or model would be refused
    old_rows = {row["label"]: row for row in (old or {}).get("rows", [])}
    for spec in specs:
        # A finished defense reruns because its config changed or it raised: start it afresh
        # (a checkpoint of another config is refused; a diverged one would diverge again).
        if spec.label in old_rows and defense_workdir(workdir, spec.label).exists():
            shutil.rmtree(defense_workdir(workdir, spec.label))
    start = time.perf_counter()
    result = compare_defenses(model, variables, dataset, attack_obj, specs,
                              model_name=metadata["model"]["name"], clean=budget.clean,
                              seed=seed, progress=not sel.quiet, workdir=workdir, resume=True)
    machine = describe_machine()
    # A cell resumed on another machine mixes rows of both: each row says where it ran.
    ran_on = summarize_machine(machine)
    new_rows = {row["label"]: {**row, "machine": ran_on} for row in result["rows"]}
    order = [report.NONE_LABEL, *sel.defenses, *old_rows]
    rows = [new_rows.get(label, old_rows.get(label)) for label in dict.fromkeys(order)]
    return {"table": sel.config.name, "dataset": sel.config.dataset, "attack": attack,
            "budget": budget.name, "seed": seed, "clean_options": dict(budget.options),
            "clean_data": result["clean_data"], "n_clean": result["n_clean"],
            "eval_size": result["eval_size"], "checkpoint": str(sel.model_dir(attack)),
            "model": result["model"], "model_sha256": metadata.get("variables_sha256"),
            "attack_params": result["attack_params"], "rows": [r for r in rows if r],
            "wall_seconds": (old or {}).get("wall_seconds", 0.0) + time.perf_counter() - start,
            "command": sel.command, "versions": library_versions(), "machine": machine}


def _list_cells(sel: Selection, cells, wanted) -> None:
    config = sel.config
    for attack in sel.attacks:
        model = sel.model_dir(attack)
        state = "trained" if (model / "metadata.json").is_file() else "missing, will be trained"
        print(f"model {model}: {state}")
    for index, (attack, budget, seed) in enumerate(cells, 1):
        name = cell_name(config.dataset, attack, budget.name, seed)
        old = _read_json(sel.table_dir / "cells" / f"{name}.json")
        labels, void = to_run(old, wanted[budget.name], budget.clean.to_dict(),
                              _model_sha(sel.model_dir(attack)), sel.retry_errors)
        state = ("missing" if old is None else "done" if not labels else
                 "other clean data or model, will rerun all" if void else
                 f"will run {', '.join(labels)}")
        print(f"[{index}/{len(cells)}] {name}: {state}")
    labels = list(next(iter(wanted.values())))
    print(f"{len(cells)} cells x {len(labels)} defenses ({', '.join(labels)}); "
          f"out: {sel.table_dir}")


def write_table(sel: Selection, cells) -> bool:
    """Rewrites table.json/.md/.png from the selection's cell files; returns whether a
    selected defense recorded an error."""
    config = sel.config
    found = [cell for a, b, s in cells if (cell := _read_json(
        sel.table_dir / "cells" / f"{cell_name(config.dataset, a, b.name, s)}.json"))]
    labels = [report.NONE_LABEL, *sel.defenses]
    rows = report.raw_rows(found, labels)
    budgets = [b.name for b in sel.budgets]
    aggregates = report.aggregate(rows, budgets, sel.attacks, labels)
    missing = len(cells) - len(found)
    notes = [f"Command: `{sel.command}`", "",
             (f"Metrics in percent, mean ± sample std over the seeds that finished (n); seeds "
              f"{sel.seeds}; ASR over non-target images, ASR (all) over every triggered image; "
              "seconds: the defense's mean wall time per cell.")]
    if missing:
        notes += ["", f"{missing} of {len(cells)} cells are not finished yet."]
    descriptions = {b.name: json.dumps(dict(b.options)) for b in sel.budgets}
    write_json_atomic(sel.table_dir / "table.json", {
        "table": config.name, "title": config.title, "dataset": config.dataset,
        "command": sel.command, "zoo_size": config.zoo_size,
        "selection": {"attacks": sel.attacks, "defenses": sel.defenses, "seeds": sel.seeds,
                      "budgets": [{"name": b.name, "options": dict(b.options),
                                   "overrides": {k: dict(v) for k, v in b.overrides.items()},
                                   "clean_data": b.clean.to_dict()} for b in sel.budgets]},
        "overrides": sel.overrides, "models_dir": str(sel.models_dir),
        "cells": {"expected": len(cells), "finished": len(found)},
        "std": "sample standard deviation over seeds (ddof=1); None for one seed",
        "aggregates": aggregates, "rows": rows, "versions": library_versions()})
    markdown = report.table_markdown(config.title, aggregates, descriptions, notes)
    write_atomic(sel.table_dir / "table.md", lambda tmp: Path(tmp).write_text(markdown))
    report.plot_table(aggregates, budgets, labels, sel.table_dir / "table.png", config.title)
    return any(row["error"] for row in rows if row["label"] != report.NONE_LABEL)


def run_figure(sel: Selection, train: TrainFn) -> bool:
    """Runs the selected Figure D sweeps that are not finished, then writes the figure."""
    from awm_jax.defenses.awm.config import AWMConfig

    config, (attack,), budget = sel.config, sel.attacks, sel.budgets[0]
    model_dir = sel.model_dir(attack)
    awm = AWMConfig(**budget_overrides(sel.overrides, budget, ["awm"]).get("awm", {}))
    settings = {hparam: _jsonable({
        "hparam": hparam, "values": list(config.values[hparam]), "seeds": sel.seeds,
        "attack": attack, "clean_data": budget.clean.to_dict(), "awm": awm.to_dict()})
        for hparam in sel.hparams}
    paths = {hparam: sel.table_dir / f"sweep_{hparam}.json" for hparam in sel.hparams}
    if sel.dry_run:
        print(f"model {model_dir}: " + ("trained" if (model_dir / "metadata.json").is_file()
                                        else "missing, will be trained"))
        for index, hparam in enumerate(sel.hparams, 1):
            old = _read_json(paths[hparam])
            state = ("missing" if old is None else "done" if _fresh(old, settings[hparam],
                                                                    model_dir) else "stale")
            print(f"[{index}/{len(sel.hparams)}] sweep {hparam} {settings[hparam]['values']} "
                  f"x seeds {sel.seeds}: {state}")
        print(f"out: {sel.table_dir}")
        return False
    if sel.report_only:
        write_figure(sel, awm)
        return False
    train(config.dataset, [attack], config.zoo_size, sel.models_dir, sel.table_dir)
    loaded = None
    for index, hparam in enumerate(sel.hparams, 1):
        if _fresh(_read_json(paths[hparam]), settings[hparam], model_dir):
            print(f"[{index}/{len(sel.hparams)}] sweep {hparam}: done, skipped", flush=True)
            continue
        print(f"[{index}/{len(sel.hparams)}] sweep {hparam} over {config.values[hparam]} x "
              f"seeds {sel.seeds}", flush=True)
        loaded = loaded or _load(model_dir)
        table = _sweep(sel, loaded, hparam, awm, budget, settings[hparam])
        write_json_atomic(paths[hparam], {**table, "settings": settings[hparam],
                                          "model_sha256": _model_sha(model_dir),
                                          "command": sel.command, "versions": library_versions(),
                                          "machine": describe_machine()})
        print(f"  sweep {hparam}: {table['seconds']:.0f} s", flush=True)
        write_figure(sel, awm)
    write_figure(sel, awm)
    return False


def _fresh(old: dict[str, Any] | None, settings: dict[str, Any], model_dir: Path) -> bool:
    return (old is not None and old.get("settings") == settings and
            old.get("model_sha256") == _model_sha(model_dir))


def _sweep(sel: Selection, loaded: tuple, hparam: str, awm, budget: Budget,
           settings: dict[str, Any]) -> dict[str, Any]:
    from awm_jax.sweep import SweepSpec
    from awm_jax.sweep.job import sweep_model

    model, variables, dataset, attack, metadata = loaded
    spec = SweepSpec(grid={hparam: list(sel.config.values[hparam])}, seeds=sel.seeds)
    # A new workdir for new settings: a sweep checkpoint of other settings would be refused.
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return sweep_model(model, variables, dataset, attack, awm, spec, clean=budget.clean,
                       progress=not sel.quiet, extra={"checkpoint": str(sel.model_dir(
                           settings["attack"])), "model": metadata["model"]["name"]},
                       workdir=sel.workdir / sel.config.name / f"{hparam}_{digest}",
                       resume=True)


def write_figure(sel: Selection, awm) -> None:
    """Rewrites figure_d.json/.md/.png from the finished sweep files of the selection."""
    config = sel.config
    points, sources = {}, {}
    for hparam in sel.hparams:
        table = _read_json(sel.table_dir / f"sweep_{hparam}.json")
        if table is not None:
            points[hparam] = report.aggregate_sweep(table, hparam)
            sources[hparam] = f"sweep_{hparam}.json"
    defaults = {h: getattr(awm, h) for h in sel.hparams}
    notes = [f"Command: `{sel.command}`", "",
             (f"{sel.attacks[0]} model, clean data {json.dumps(dict(sel.budgets[0].options))}; "
              f"metrics in percent, mean ± sample std over seeds {sel.seeds}.")]
    write_json_atomic(sel.table_dir / "figure_d.json", {
        "figure": config.name, "title": config.title, "dataset": config.dataset,
        "attack": sel.attacks[0], "budget": sel.budgets[0].name, "command": sel.command,
        "awm": awm.to_dict(), "defaults": defaults, "seeds": sel.seeds, "sources": sources,
        "std": "sample standard deviation over seeds (ddof=1); None for one seed",
        "points": points, "versions": library_versions()})
    markdown = report.figure_markdown(config.title, points, defaults, notes)
    write_atomic(sel.table_dir / "figure_d.md", lambda tmp: Path(tmp).write_text(markdown))
    if points:
        report.plot_figure(points, defaults, config.log_x, sel.table_dir / "figure_d.png",
                           config.title)
