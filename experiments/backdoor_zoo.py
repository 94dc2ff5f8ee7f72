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

Writes ``<out>/results.json`` (one row per model: metrics, targets, command, wall time, the
training history) and ``<out>/summary.md``.
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
from pathlib import Path

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
                  models_dir: Path, source: str) -> list[str]:
    """The ``awm-jax train-backdoor`` argv for one zoo model."""
    attack: AttackRecipe | None = ATTACKS[attack_name]
    config = recipe.train if attack is None else dataclasses.replace(
        recipe.train, poison_rate=attack.poison_rate)
    argv = ["awm-jax", "train-backdoor", "--dataset", source,
            "--attack", "none" if attack is None else attack.attack, "--out", _relative(out),
            "--eval-every", "3", "--quiet"]
    for key, value in (attack.params if attack else {}).items():
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


def _row(dataset: str, attack_name: str, model_dir: Path, argv: list[str]) -> dict:
    metadata = json.loads((model_dir / "metadata.json").read_text())
    metrics = metadata["metrics"]
    recipe = ATTACKS[attack_name]
    row = {"dataset": dataset, "attack": attack_name, "model": metadata["model"]["name"],
           "model_kwargs": metadata["model"]["kwargs"],
           **{k: metrics.get(k) for k in ("acc", "asr", "asr_all", "ra")},
           "epochs": metadata["train_config"]["epochs"],
           "poison_rate": None if recipe is None else recipe.poison_rate,
           "poisoned_count": metadata["poisoned_count"], "seconds": metadata["seconds"],
           "command": shlex.join(argv), "checkpoint": _relative(model_dir),
           "history": metadata["history"]}
    row["acc_target_met"] = metrics["acc"] >= ACC_TARGET.get(dataset, 0.0)
    if recipe is not None:
        bar = ASR_TARGET["clean_label" if attack_name in CLEAN_LABEL else "dirty"]
        row["asr_target"] = bar
        row["asr_target_met"] = metrics["asr"] >= bar
    return row


def _train(argv: list[str], model_dir: Path, log: Path) -> None:
    if (model_dir / "checkpoints").is_dir():
        argv = argv + ["--resume"]
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    executable = str(Path(sys.executable).with_name("awm-jax"))
    print(f"training: {shlex.join(argv)}\n  log: {log}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as stream:
        done = subprocess.run([executable, *argv[1:]], cwd=REPO_ROOT, stdout=stream,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"training failed ({done.returncode}); see {log}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


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
    parser.add_argument("--models-dir", default="runs/zoo")
    parser.add_argument("--out", default="experiments/results/backdoor_zoo")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.attacks) - set(ATTACKS))
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {list(ATTACKS)}")
    sources = dict(pair.split("=", 1) for pair in args.source)
    attacks = [a for a in ATTACKS if a in args.attacks or (a == "clean" and "clb" in args.attacks)]
    models_dir = (REPO_ROOT / args.models_dir).resolve()
    logs = models_dir / "logs"
    if not (args.dry_run or args.table_only):
        lock = _lock(models_dir)
        if lock is None:
            parser.error(f"another backdoor_zoo.py is training into {models_dir} (it holds "
                         f"{models_dir / LOCK_NAME}); wait for it, or use another --models-dir")
    rows = []
    for name in args.datasets:
        recipe = DATASETS[args.size][name]
        source = sources.get(name, recipe.source)
        for attack_name in attacks:
            model_dir = models_dir / name / attack_name
            argv = train_command(name, recipe, attack_name, model_dir, models_dir, source)
            if args.dry_run:
                print(shlex.join(argv))
                continue
            if not (model_dir / "metadata.json").is_file():
                if args.table_only:
                    continue
                logs.mkdir(parents=True, exist_ok=True)
                _train(argv, model_dir, logs / f"{name}_{attack_name}.log")
            rows.append(_row(name, attack_name, model_dir, argv))
            # Rewritten after every model, so a driver stopped mid-zoo leaves a current table.
            _write_table(REPO_ROOT / args.out, rows, args.size)
    if args.dry_run:
        return
    _write_table(REPO_ROOT / args.out, rows, args.size)
    print(_markdown(rows))


def _write_table(out: Path, rows: list[dict], size: str) -> None:
    write_json_atomic(out / "results.json", {
        "command": shlex.join(["python", "experiments/backdoor_zoo.py", *sys.argv[1:]]),
        "size": size, "acc_target": ACC_TARGET, "asr_target": ASR_TARGET, "rows": rows,
        "versions": library_versions()})
    write_atomic(out / "summary.md", lambda tmp: Path(tmp).write_text(_markdown(rows)))


if __name__ == "__main__":
    main()
