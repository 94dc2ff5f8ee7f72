"""Trains the backdoored-model zoo (every attack on CIFAR-10 and GTSRB) and tabulates it.

One command regenerates the table; models already trained are read back, interrupted ones
resume from their last epoch checkpoint (``awm-jax train-backdoor --resume``), missing ones are
trained. Each model is trained by the CLI in a subprocess, so the table's command column is
exactly what ran.

    .venv/bin/python experiments/backdoor_zoo.py --datasets cifar10 gtsrb \
        --models-dir runs/zoo --out experiments/results/backdoor_zoo

``--attacks badnets sig`` limits the attacks, ``--size full`` uses the GPU/TPU recipes,
``--source cifar10=cifar10`` reads CIFAR-10 through TFDS instead of the shared archive,
``--table-only`` only tabulates what exists, and ``--dry-run`` prints the commands. CLB needs the
clean model of its dataset, so "clean" is trained first whenever CLB is asked for.

``--set KEY=VALUE`` overrides a field of every recipe's ``TrainConfig`` (e.g. ``--set epochs=24
--set conv_impl=lax`` on a GPU, where XLA's own convolutions are the fast ones); the overrides
appear in each model's command. ``--jobs N`` trains up to N models at once (on one GPU, several
small models keep it busier than one); a failed model does not stop the others, and the driver
exits 1 naming every failure once the rest are done.

Writes ``<out>/results.json`` (one row per model: metrics, targets, command, wall time, the
training history) and ``<out>/summary.md``; rows already there for models outside this
command's ``--datasets`` x ``--attacks`` are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

from awm_jax.config_flags import field_parser
from awm_jax.serialization import library_versions, write_json_atomic, write_atomic
from awm_jax.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs.zoo import ATTACKS, DATASETS, AttackRecipe, DatasetRecipe  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The bars: clean ACC per dataset, ASR for dirty-label and clean-label attacks.
ACC_TARGET = {"cifar10": 0.85, "gtsrb": 0.95}
ASR_TARGET = {"dirty": 0.95, "clean_label": 0.80}
CLEAN_LABEL = ("sig", "clb")


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _param(value) -> str:
    # The CLI parses K=V values as JSON when they parse, else as strings.
    return value if isinstance(value, str) else json.dumps(value)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def train_command(name: str, recipe: DatasetRecipe, attack_name: str, out: Path,
                  models_dir: Path, source: str, config: TrainConfig | None = None) -> list[str]:
    """The ``awm-jax train-backdoor`` argv for one zoo model (``config``: the training config
    to spell out instead of the recipe's, e.g. the one a finished model recorded)."""
    attack: AttackRecipe | None = ATTACKS[attack_name]
    if config is None:
        config = recipe.train if attack is None else dataclasses.replace(
            recipe.train, poison_rate=attack.poison_rate)
    argv = ["awm-jax", "train-backdoor", "--dataset", source,
            "--attack", "none" if attack is None else attack.attack, "--out", _relative(out),
            "--eval-every", "3", "--quiet"]
    params = {} if attack is None else {**attack.params,
                                        **recipe.attack_params.get(attack_name, {})}
    for key, value in params.items():
        argv += ["--attack-param", f"{key}={_param(value)}"]
    for key, value in config.model_kwargs.items():
        argv += ["--model-param", f"{key}={_param(value)}"]
    default = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if field.name != "model_kwargs" and value != getattr(default, field.name):
            argv += [f"--{field.name.replace('_', '-')}", _flag_value(value)]
    if attack is not None and attack.attack == "clb":
        argv += ["--clean-checkpoint", _relative(models_dir / name / "clean")]
    return argv


def _row(dataset: str, attack_name: str, model_dir: Path, recipe: DatasetRecipe,
         source: str) -> dict:
    metadata = json.loads((model_dir / "metadata.json").read_text())
    # The command is rebuilt from the config the model recorded, so a model trained with other
    # settings than today's recipe (e.g. --set conv_impl=lax on a GPU) shows what produced it.
    argv = train_command(dataset, recipe, attack_name, model_dir, model_dir.parents[1], source,
                         config=TrainConfig.from_dict(metadata["train_config"]))
    metrics = metadata["metrics"]
    recipe = ATTACKS[attack_name]
    row = {"dataset": dataset, "attack": attack_name, "model": metadata["model"]["name"],
           "model_kwargs": metadata["model"]["kwargs"],
           **{k: metrics.get(k) for k in ("acc", "asr", "asr_all", "ra")},
           "epochs": metadata["train_config"]["epochs"],
           "poison_rate": None if recipe is None else recipe.poison_rate,
           "poisoned_count": metadata["poisoned_count"], "seconds": metadata["seconds"],
           "command": shlex.join(argv), "checkpoint": _relative(model_dir),
           "variables_sha256": metadata.get("variables_sha256"),
           "versions": metadata.get("versions"), "history": metadata["history"]}
    row["acc_target_met"] = metrics["acc"] >= ACC_TARGET.get(dataset, 0.0)
    if recipe is not None:
        bar = ASR_TARGET["clean_label" if attack_name in CLEAN_LABEL else "dirty"]
        row["asr_target"] = bar
        row["asr_target_met"] = metrics["asr"] >= bar
    return row


def _train(argv: list[str], model_dir: Path, log: Path) -> None:
    """Runs one ``awm-jax`` command (as ``python -m awm_jax``, which needs no console script)
    with its output in ``log``; raises ``RuntimeError`` naming the log if it fails."""
    if (model_dir / "checkpoints").is_dir():
        argv = argv + ["--resume"]
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"training: {shlex.join(argv)}\n  log: {log}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as stream:
        done = subprocess.run([sys.executable, "-m", "awm_jax", *argv[1:]], cwd=REPO_ROOT,
                              stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"training {model_dir} failed (exit {done.returncode}); see {log}")
    print(f"  {_relative(model_dir)} done in {time.perf_counter() - start:.0f} s", flush=True)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "comma-separated integers"}


def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=24", "conv_impl=lax"]`` -> ``TrainConfig`` field values, each parsed as its
    ``awm-jax train-backdoor --<field>`` flag parses it (bool: true/false; tuple:
    comma-separated ints).

    Raises:
      ValueError: a pair without ``=``, an unknown or non-scalar field, or an unparsable value.
    """
    defaults = TrainConfig()
    settable = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_kwargs"}
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if key not in settable:
            raise ValueError(f"--set {pair!r}: {key!r} is not a TrainConfig field; settable: "
                             f"{sorted(settable)}")
        try:
            value = field_parser(TrainConfig, key)(text)
        except (ValueError, argparse.ArgumentTypeError) as error:
            kind = _KIND_NAMES[type(getattr(defaults, key))]
            raise ValueError(f"--set {pair!r}: {key} takes {kind} ({error})") from None
        overrides[key] = value
    return overrides


def _markdown(rows: list[dict]) -> str:
    lines = ["| dataset | attack | model | epochs | ACC | ASR | ASR_all | RA | poisoned | "
             "train min | targets met |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        width = r["model_kwargs"].get("width")
        model = r["model"] + (f" w{width}" if width else "")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        met = "ACC " + ("yes" if r["acc_target_met"] else "no")
        if "asr_target_met" in r:
            met += ", ASR " + ("yes" if r["asr_target_met"] else "no")
        lines.append(f"| {r['dataset']} | {r['attack']} | {model} | {r['epochs']} | "
                     f"{fmt(r['acc'])} | {fmt(r['asr'])} | {fmt(r['asr_all'])} | "
                     f"{fmt(r['ra'])} | {r['poisoned_count']} | {r['seconds'] / 60:.1f} | "
                     f"{met} |")
    return "\n".join(lines) + "\n"


LOCK_NAME = ".zoo.lock"


def _lock(models_dir: Path):
    """An exclusive lock on ``models_dir`` for this process's lifetime (the open file), or
    ``None`` if another driver holds it: two drivers would train the same model at once."""
    models_dir.mkdir(parents=True, exist_ok=True)
    handle = open(models_dir / LOCK_NAME, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "gtsrb"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS),
                        help=f"subset of {list(ATTACKS)}")
    parser.add_argument("--size", choices=sorted(DATASETS), default="cpu")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=SOURCE",
                        help="dataset source override, e.g. cifar10=cifar10 for TFDS")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a TrainConfig field of every recipe")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at once [1]")
    parser.add_argument("--models-dir", default="runs/zoo")
    parser.add_argument("--out", default="experiments/results/backdoor_zoo")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.attacks) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {list(ATTACKS)}")
    unknown = sorted(set(args.datasets) - set(DATASETS[args.size]))
    if unknown:
        parser.error(f"unknown datasets {unknown} for --size {args.size}; known: "
                     f"{sorted(DATASETS[args.size])}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        overrides = parse_overrides(args.overrides)
        recipes = {name: dataclasses.replace(DATASETS[args.size][name], train=dataclasses.replace(
            DATASETS[args.size][name].train, **overrides)) for name in args.datasets}
    except ValueError as error:
        parser.error(str(error))
    sources = dict(pair.split("=", 1) for pair in args.source)
    attacks = [a for a in ATTACKS if a in args.attacks or (a == "clean" and "clb" in args.attacks)]
    models_dir = (REPO_ROOT / args.models_dir).resolve()
    logs = models_dir / "logs"
    if not (args.dry_run or args.table_only):
        lock = _lock(models_dir)
        if lock is None:
            parser.error(f"another backdoor_zoo.py is training into {models_dir} (it holds "
                         f"{models_dir / LOCK_NAME}); wait for it, or use another --models-dir")
    tasks = []  # (dataset, attack, model dir, argv, recipe, source), in table order
    for name, recipe in recipes.items():
        source = sources.get(name, recipe.source)
        for attack_name in attacks:
            model_dir = models_dir / name / attack_name
            argv = train_command(name, recipe, attack_name, model_dir, models_dir, source)
            tasks.append((name, attack_name, model_dir, argv, recipe, source))
    selected = {(task[0], task[1]) for task in tasks}
    if args.dry_run:
        for task in tasks:
            print(shlex.join(task[3]))
        return
    failures = _train_missing(tasks, logs, args.jobs, args.table_only,
                              on_done=lambda rows: _write_table(REPO_ROOT / args.out, rows,
                                                                args.size, selected))
    rows = _write_table(REPO_ROOT / args.out, _rows(tasks), args.size, selected)
    print(_markdown(rows))
    if failures:
        raise SystemExit("some models failed:\n" + "\n".join(f"  {f}" for f in failures))


def _rows(tasks) -> list[dict]:
    return [_row(name, attack, model_dir, recipe, source)
            for name, attack, model_dir, _, recipe, source in tasks
            if (model_dir / "metadata.json").is_file()]


def _train_missing(tasks, logs: Path, jobs: int, table_only: bool, on_done) -> list[str]:
    """Trains every task without a ``metadata.json``, ``jobs`` at a time, CLB after the clean
    model of its dataset; calls ``on_done(rows)`` after each model (so a driver stopped
    mid-zoo leaves a current table) and returns the failures' messages."""
    missing = [] if table_only else [t for t in tasks if not (t[2] / "metadata.json").is_file()]
    if missing:
        logs.mkdir(parents=True, exist_ok=True)
    futures: dict[tuple[str, str], Future] = {}

    def train(name, attack_name, model_dir, argv, *_):
        if attack_name == "clb" and (name, "clean") in futures:
            futures[(name, "clean")].result()  # raises if the clean model failed
        _train(argv, model_dir, logs / f"{name}_{attack_name}.log")

    failures = []
    # Clean models are submitted before their CLB (the tasks' order), and the pool starts
    # tasks in submission order, so a CLB waiting for its clean model cannot starve it.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for task in missing:
            futures[(task[0], task[1])] = pool.submit(train, *task)
        for future in as_completed(futures.values()):
            error = future.exception()
            if error is not None:
                failures.append(str(error))
                print(f"FAILED: {error}", flush=True)
            on_done(_rows(tasks))  # from this thread only: one writer
    return failures


def _write_table(out: Path, rows: list[dict], size: str,
                 selected: set[tuple[str, str]]) -> list[dict]:
    """Writes ``out/results.json`` and ``out/summary.md``; returns the table's rows.

    ``rows`` are the models of this command's ``selected`` ``(dataset, attack)`` pairs; the
    rows of an earlier table at ``out`` for other pairs are kept, so a command narrowed to a
    few attacks adds to the table instead of dropping the rest of it.
    """
    kept = [row for row in _old_rows(out / "results.json")
            if (row["dataset"], row["attack"]) not in selected]
    attack_order = {name: i for i, name in enumerate(ATTACKS)}
    rows = sorted([*kept, *rows], key=lambda r: (r["dataset"], attack_order.get(r["attack"], 99)))
    write_json_atomic(out / "results.json", {
        "command": shlex.join(["python", "experiments/backdoor_zoo.py", *sys.argv[1:]]),
        "size": size, "acc_target": ACC_TARGET, "asr_target": ASR_TARGET, "rows": rows,
        "versions": library_versions()})
    write_atomic(out / "summary.md", lambda tmp: Path(tmp).write_text(_markdown(rows)))
    return rows


def _old_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["rows"]
        if not all({"dataset", "attack"} <= set(row) for row in rows):
            raise ValueError("a row without dataset or attack")
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{path} is not a zoo table ({error}); move it away or pick another "
                         "--out, so its rows are not lost") from None
    return rows


if __name__ == "__main__":
    main()
