"""Wall time of a vmapped sweep vs the same members run one after another with ``run_awm``.

``python -m awm_jax.sweep.benchmark --checkpoint runs/demo_models/seed0 --epochs 30 --out
bench.json`` uses the demo's one-shot clean data and AWM settings (batch 32) with a 2 x 2 grid
over alpha and tau. Both timings include compilation (each ``run_awm`` call compiles its own
steps; the sweep compiles once) and report how far the masks differ. Over 30 epochs that
difference is large (0.46 on the demo model) although the keys and hyperparameters are the same:
the members agree with their single runs to ~1e-7 for the first epochs and AWM's dynamics amplify
the rounding differences of the vmapped convolutions (see :mod:`awm_jax.sweep.runner` and
``experiments/benchmarks/sweep_drift.py``); compare final metrics, not masks, over long runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from awm_jax.checkpoint import load_model
from awm_jax.data.clean_subset import draw_clean_subset
from awm_jax.data.sources import load_dataset
from awm_jax.defenses.awm.runner import run_awm
from awm_jax.demo import DemoConfig
from awm_jax.sweep.runner import run_sweep
from awm_jax.sweep.spec import SweepSpec, member_keys


def benchmark(checkpoint: str, epochs: int, seed: int = 0) -> dict:
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(metadata["dataset"]["name"])
    demo = DemoConfig()
    config = dataclasses.replace(demo.awm, outer_epochs=epochs, mask_selection="last")
    spec = SweepSpec(grid={"alpha": [0.8, 0.9], "tau": [50.0, 100.0]}, seeds=[seed])
    clean, _ = draw_clean_subset(dataset.test, dataset.num_classes, member_keys(seed)["clean"],
                                 demo.clean)
    start = time.perf_counter()
    swept = run_sweep(model, variables, clean, config, spec, progress=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(swept.masks))
    vmapped = time.perf_counter() - start
    start = time.perf_counter()
    singles = [run_awm(model, variables, clean, c, member_keys(seed)["defense"], progress=False)
               for c in spec.configs(config)]
    sequential = time.perf_counter() - start
    max_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for i, single in enumerate(singles)
                   for a, b in zip(jax.tree_util.tree_leaves(swept.member_mask(i)),
                                   jax.tree_util.tree_leaves(single.mask)))
    return {"checkpoint": checkpoint, "members": 4, "epochs": epochs, "n_clean": len(clean),
            "batch_size": config.batch_size, "steps_per_phase": 5 * max(1, len(clean) // 32),
            "vmapped_seconds": vmapped, "sequential_seconds": sequential,
            "speedup": sequential / vmapped, "max_mask_difference": max_diff,
            "device": str(jax.devices()[0]), "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo_models/seed0")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = benchmark(args.checkpoint, args.epochs)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
