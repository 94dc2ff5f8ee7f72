"""Regenerates the reproduction study's tables and figure (issue 7), one command each.

    .venv/bin/python experiments/reproduction.py table-a    # CIFAR-10: attacks x defenses x budgets
    .venv/bin/python experiments/reproduction.py table-b    # GTSRB, the same
    .venv/bin/python experiments/reproduction.py table-c    # ANP -> AWM ablation, CIFAR-10 BadNets
    .venv/bin/python experiments/reproduction.py figure-d   # AWM vs alpha, gamma, tau

What each table holds is ``experiments/configs/reproduction.py`` (``--size cpu|full|smoke``);
``--attacks``, ``--defenses``, ``--budgets``, ``--seeds`` (and ``--hparams`` for figure-d) narrow
it, ``--override NAME.FIELD=VALUE`` changes a defense setting, ``--dry-run`` lists the cells and
which exist. Missing backdoored models are trained first by ``experiments/backdoor_zoo.py``
(into ``--models-dir``, default ``runs/zoo``).

A table's cell is one (attack, budget, seed): one ``compare_defenses`` call running every defense
on one clean draw, written to ``<out>/<table>/cells/<dataset>_<attack>_<budget>_seed<S>.json``.
A finished cell is skipped; one whose settings changed (clean data, model, a defense's config)
reruns what changed; defenses of an interrupted cell resume from their checkpoints in
``<workdir>/<table>/<cell>/``; ``--retry-errors`` reruns defenses that raised. After every cell
``table.json`` (raw rows, mean/std/min/max over seeds, the command, library versions),
``table.md`` and ``table.png`` are rewritten for the cells of this command's selection;
``--report-only`` rewrites them from the cell files present without training or running
anything (cells collected by narrower commands, e.g. one attack at a time, into one table).
Figure D writes ``<out>/figure_d/sweep_<hparam>.json`` per sweep (a finished one is skipped),
then ``figure_d.{json,md,png}``; ``--budgets`` takes one of Table A's budgets (default
one_shot), another than the default writing to ``<out>/figure_d_<budget>/``. The exit status is
1 when a selected defense recorded an error (as ``awm-jax compare``), else 0.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS.parent
sys.path.insert(0, str(EXPERIMENTS))
import reproduction_report as report
from configs.reproduction import SIZES, TABLES, TableConfig, get_config
from configs.zoo import ATTACKS as ZOO_ATTACKS
from configs.zoo import DATASETS as ZOO_DATASETS
from reproduction_cells import Selection, run_figure, run_table

KNOWN_ATTACKS = [name for name in ZOO_ATTACKS if name != "clean"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("table", choices=TABLES)
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument("--attacks", nargs="+", default=None, help="[default: the table's]")
    parser.add_argument("--defenses", nargs="+", default=None,
                        help="compare names, NAME or NAME:PRESET [default: the table's]")
    parser.add_argument("--budgets", nargs="+", default=None, help="[default: the table's]")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="[default: the table's, 0 1 2 at cpu/full size]")
    parser.add_argument("--hparams", nargs="+", default=None,
                        help="figure-d: the swept hyperparameters [default: all]")
    parser.add_argument("--override", action="append", default=[], metavar="NAME.FIELD=VALUE",
                        help="a defense setting (figure-d: awm.FIELD); VALUE is JSON when it "
                             "parses, else a string; repeatable")
    parser.add_argument("--models-dir", default="runs/zoo")
    parser.add_argument("--workdir", default="runs/reproduction",
                        help="defense and sweep checkpoints, per table and cell")
    parser.add_argument("--out", default="experiments/results/reproduction")
    parser.add_argument("--retry-errors", action="store_true",
                        help="rerun defenses whose finished cells recorded an error")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the models and cells and which exist; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table (figure) files from the cell (sweep) files "
                             "present; train and run nothing")
    return parser


def _overrides(parser, pairs: list[str]) -> dict[str, dict]:
    changes: dict[str, dict] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        name, dot, field = key.partition(".")
        if not (sep and dot and name and field):
            parser.error(f"--override expects NAME.FIELD=VALUE; got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        changes.setdefault(name.strip(), {})[field.strip().replace("-", "_")] = value
    return changes


def _pick(parser, flag: str, asked: list | None, known: list, default: list) -> list:
    if asked is None:
        return list(default)
    unknown = [name for name in asked if name not in known]
    if unknown:
        parser.error(f"unknown {flag} {unknown}; known: {known}")
    return list(dict.fromkeys(asked))


def selection(argv: list[str] | None = None) -> Selection:
    """Parses the command line into the config and the selected part of it (errors exit 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    config = get_config(args.table, args.size)
    if config.dataset not in ZOO_DATASETS[config.zoo_size]:
        parser.error(f"the zoo has no {config.dataset!r} at size {config.zoo_size!r}")
    overrides = _overrides(parser, args.override)
    if args.dry_run and args.report_only:
        parser.error("--dry-run writes nothing and --report-only writes the tables; pick one")
    common = {"config": config, "seeds": list(dict.fromkeys(args.seeds or config.seeds)),
              "models_dir": _resolve(args.models_dir), "workdir": _resolve(args.workdir),
              "out": _resolve(args.out), "quiet": args.quiet, "dry_run": args.dry_run,
              "report_only": args.report_only,
              "retry_errors": args.retry_errors,
              "command": shlex.join(["python", "experiments/reproduction.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    if isinstance(config, TableConfig):
        if args.hparams is not None:
            parser.error(f"--hparams is for figure-d, not {args.table}")
        budgets = _pick(parser, "budgets", args.budgets, [b.name for b in config.budgets],
                        [b.name for b in config.budgets])
        defenses = [d for d in (args.defenses or config.defenses) if d != report.NONE_LABEL]
        merged = {name: {**config.overrides.get(name, {}), **overrides.get(name, {})}
                  for name in set(config.overrides) | set(overrides)
                  if name in {d.partition(":")[0] for d in defenses}}
        _check_defenses(parser, defenses, merged, overrides, config)
        return Selection(**common, attacks=_pick(parser, "attacks", args.attacks, KNOWN_ATTACKS,
                                                 config.attacks),
                         budgets=[b for b in config.budgets if b.name in budgets],
                         defenses=defenses, overrides=merged, hparams=[])
    if args.defenses is not None:
        parser.error("figure-d sweeps AWM only; --defenses is for the tables")
    unknown = sorted(set(overrides) - {"awm"})
    if unknown:
        parser.error(f"figure-d takes --override awm.FIELD=VALUE only; got {unknown}")
    attacks = _pick(parser, "attacks", args.attacks, KNOWN_ATTACKS, [config.attack])
    # Any of Table A's budgets; the figure of another budget than the default gets its own
    # directory (Selection.table_dir).
    known = {b.name: b for b in (config.budget, *get_config("table-a", args.size).budgets)}
    budgets = _pick(parser, "budgets", args.budgets, list(known), [config.budget.name])
    if len(attacks) != 1 or len(budgets) != 1:
        parser.error("figure-d sweeps one attack at one budget")
    return Selection(**common, attacks=attacks, budgets=[known[budgets[0]]], defenses=["awm"],
                     overrides={"awm": {**config.awm, **overrides.get("awm", {})}},
                     hparams=_pick(parser, "hparams", args.hparams, list(config.values),
                                   list(config.values)))


def _check_defenses(parser, defenses, merged, overrides, config) -> None:
    from awm_jax.compare import resolve_defenses

    unused = sorted(set(overrides) - set(merged))
    if unused:
        parser.error(f"--override given for {unused}, which this table does not run "
                     f"(running: {defenses})")
    try:
        resolve_defenses(defenses, merged)
    except ValueError as error:
        parser.error(f"{str(error).rstrip('.')} (the table's defenses: {list(config.defenses)})")


def _resolve(path: str) -> Path:
    return (REPO_ROOT / path).resolve()


def main(argv: list[str] | None = None) -> int:
    chosen = selection(argv)
    start = time.perf_counter()
    if isinstance(chosen.config, TableConfig):
        failed = run_table(chosen, train_models)
    else:
        failed = run_figure(chosen, train_models)
    if not chosen.dry_run:
        print(f"{chosen.config.name}: finished in {time.perf_counter() - start:.0f} s; wrote "
              f"{chosen.table_dir}", flush=True)
    return 1 if failed else 0


def train_models(dataset: str, attacks: list[str], zoo_size: str, models_dir: Path,
                 table_out: Path) -> None:
    """Trains the missing ``models_dir/<dataset>/<attack>`` models with the zoo's script (its
    own table goes to ``table_out/zoo``, not to the zoo's results)."""
    missing = [a for a in attacks if not (models_dir / dataset / a / "metadata.json").is_file()]
    if not missing:
        return
    argv = [sys.executable, str(EXPERIMENTS / "backdoor_zoo.py"), "--datasets", dataset,
            "--attacks", *missing, "--size", zoo_size, "--models-dir", str(models_dir),
            "--out", str(table_out / "zoo")]
    print(f"training {len(missing)} model(s) with the zoo: {shlex.join(argv[1:])}", flush=True)
    done = subprocess.run(argv, cwd=REPO_ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"the zoo failed ({done.returncode}) training {missing}")


if __name__ == "__main__":
    sys.exit(main())
