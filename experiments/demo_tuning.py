"""Compares AWM settings on the demo's backdoored digits models (the evidence for its defaults).

Trains (or reloads) the demo's backdoored model for each seed, then purifies it with each
variant of the AWM config, all from the same one-shot clean draw, and tabulates the after-AWM
ASR and ACC drop per seed with the medians and worst cases.

    .venv/bin/python experiments/demo_tuning.py --out experiments/results/demo_tuning

Variants are JSON objects of AWMConfig overrides on top of the demo's config; ``--variants``
replaces the default list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from awm_jax.attacks.base import create_attack
from awm_jax.checkpoint import load_model
from awm_jax.data.sources import load_dataset
from awm_jax.demo import DemoConfig
from awm_jax.serialization import library_versions, write_json_atomic
from awm_jax.pipeline import purify_model
from awm_jax.training.loop import save_result, train_backdoored_model

DEFAULT_VARIANTS = [
    {"name": "official code (tau 100, last mask, no decay, 20 epochs)",
     "awm": {"tau": 100.0, "lr_decay": 1.0, "outer_epochs": 20, "mask_selection": "last"}},
    {"name": "tau 50, decay 0.9, last mask, 20 epochs",
     "awm": {"tau": 50.0, "outer_epochs": 20, "mask_selection": "last"}},
    {"name": "tau 100, decay 0.9, last mask, 20 epochs",
     "awm": {"tau": 100.0, "outer_epochs": 20, "mask_selection": "last"}},
    {"name": "tau 100, decay 0.9, min-robust-loss mask, 20 epochs",
     "awm": {"tau": 100.0, "outer_epochs": 20, "mask_selection": "min_robust_loss"}},
    {"name": "tau 100, decay 0.9, averaged mask, 20 epochs",
     "awm": {"tau": 100.0, "outer_epochs": 20, "mask_selection": "average"}},
    {"name": "demo default: tau 100, decay 0.9, averaged mask, 30 epochs", "awm": {}},
]


def backdoored_model(config: DemoConfig, seed: int, models_dir: Path, dataset, attack):
    directory = models_dir / f"seed{seed}"
    if not (directory / "metadata.json").exists():
        trained = train_backdoored_model(dataset, attack,
                                         dataclasses.replace(config.train, seed=seed),
                                         progress=False)
        save_result(directory, trained, dataset, attack, overwrite=True)
    model, variables, _ = load_model(directory)
    return model, variables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", default=None, help="JSON list of {name, awm} objects")
    parser.add_argument("--out", default="experiments/results/demo_tuning")
    parser.add_argument("--models-dir", default="runs/demo_models",
                        help="where the backdoored models are cached")
    args = parser.parse_args()
    variants = json.loads(args.variants) if args.variants else DEFAULT_VARIANTS
    config = DemoConfig()
    dataset = load_dataset(config.dataset)
    attack = create_attack(config.attack, **dict(config.attack_params))
    rows = []
    for seed in args.seeds:
        model, variables = backdoored_model(config, seed, Path(args.models_dir), dataset, attack)
        for variant in variants:
            awm = dataclasses.replace(config.awm, **variant["awm"])
            report = purify_model(model, variables, dataset, attack,
                                  model_name=config.train.model, defense_config=awm,
                                  clean=config.clean, seed=seed, progress=False)
            rows.append({"variant": variant["name"], "seed": seed, "before": report["before"],
                         "after": report["after"], "awm_seconds": report["seconds"],
                         "drop": report["before"]["acc"] - report["after"]["acc"]})
            print(f"{variant['name']} seed {seed}: ASR {report['after']['asr']:.3f} "
                  f"drop {rows[-1]['drop']:.3f}", flush=True)
    summary = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant["name"]]
        asr, drop = [r["after"]["asr"] for r in mine], [r["drop"] for r in mine]
        summary.append({"variant": variant["name"], "awm": variant["awm"],
                         "median_asr": statistics.median(asr), "max_asr": max(asr),
                         "median_drop": statistics.median(drop), "max_drop": max(drop),
                         "asr": asr, "drop": drop})
    out = Path(args.out)
    write_json_atomic(out / "summary.json", {"command": "python experiments/demo_tuning.py",
                                      "seeds": args.seeds, "summary": summary, "rows": rows,
                                      "versions": library_versions()})
    lines = ["| variant | median ASR | worst ASR | median ACC drop | worst drop | ASR per seed |",
             "|---|---:|---:|---:|---:|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['median_asr']:.3f} | {s['max_asr']:.3f} | "
                     f"{s['median_drop']:.3f} | {s['max_drop']:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in s['asr'])} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
