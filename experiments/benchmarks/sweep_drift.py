"""Where does a vmapped sweep member drift from the same member run alone?

Runs the demo's AWM settings (``DemoConfig().awm``, mask_selection "last") on a demo checkpoint's
one-shot clean set, for a 2 x 2 alpha x tau grid, both as one vmapped sweep (the sweep's jitted,
vmapped steps) and member by member (``run_awm``'s jitted steps), step for step in lock-step, and
prints the max |mask difference| and the trigger difference after the first trigger step, the
first mask step, and every epoch, plus how many inner labels differ.

    .venv/bin/python experiments/benchmarks/sweep_drift.py --checkpoint runs/demo_models/seed0 \
        --epochs 30
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.checkpoint import load_model
from awm_jax.data.clean_subset import draw_clean_subset
from awm_jax.data.sources import load_dataset
from awm_jax.defenses.awm import Frozen, make_awm_steps
from awm_jax.defenses.awm.runner import _Driver, _validate_clean
from awm_jax.demo import DemoConfig
from awm_jax.sweep.runner import _fold_in, _step_keys, _VmappedDriver
from awm_jax.sweep.spec import SweepSpec, member_keys


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _member(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def drift(checkpoint: str, epochs: int, seed: int = 0, grouped_only: bool = False) -> dict:
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(metadata["dataset"]["name"])
    demo = DemoConfig()
    config = dataclasses.replace(demo.awm, outer_epochs=epochs, mask_selection="last")
    spec = SweepSpec(grid={"alpha": [0.8, 0.9], "tau": [50.0, 100.0]}, seeds=[seed])
    clean, _ = draw_clean_subset(dataset.test, dataset.num_classes, member_keys(seed)["clean"],
                                 demo.clean)
    data = _validate_clean(clean, None)
    frozen = Frozen(variables["params"], variables["batch_stats"])
    steps = make_awm_steps(model, config, int(data["label"].shape[0]))
    single, vmapped = _Driver(steps, config), _VmappedDriver(steps, config)
    hparams, keys = spec.stack(config)
    configs = spec.configs(config)
    members = len(configs)

    swept = vmapped.init(frozen.params, data, hparams)
    alone = [steps.init(frozen.params, data, c.hparams()) for c in configs]
    epochs_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)[1]
    alone_keys = [jax.random.split(k)[1] for k in keys]
    rows = []
    for epoch in range(epochs):
        swept_epoch_keys = _fold_in(epochs_keys, epoch)
        trigger_keys, mask_keys = _step_keys(swept_epoch_keys, steps.steps_per_phase)
        swept = vmapped.begin_epoch(swept, frozen, data, hparams)
        alone = [single.begin_epoch(s, frozen, data, c.hparams()) for s, c in zip(alone, configs)]
        label_flips = [int((np.asarray(swept.inner_labels[i]) != np.asarray(alone[i].inner_labels))
                           .sum()) for i in range(members)]
        first = {}
        for t, step_keys in enumerate(trigger_keys):
            swept, _ = vmapped.trigger_step(swept, frozen, data, step_keys, hparams)
            alone = [single.trigger_step(s, frozen, data, step_keys[i], configs[i].hparams())[0]
                     for i, s in enumerate(alone)]
            if t == 0:
                first["trigger_after_1_step"] = max(
                    _max_diff(swept.trigger[i], alone[i].trigger) for i in range(members))
        swept = vmapped.end_trigger_phase(swept, hparams)
        alone = [single.end_trigger_phase(s, c.hparams()) for s, c in zip(alone, configs)]
        trig = max(_max_diff(swept.trigger[i], alone[i].trigger) for i in range(members))
        for t, step_keys in enumerate(mask_keys):
            swept, _ = vmapped.mask_step(swept, frozen, data, step_keys, hparams)
            alone = [single.mask_step(s, frozen, data, step_keys[i], configs[i].hparams())[0]
                     for i, s in enumerate(alone)]
            if t == 0:
                first["mask_after_1_step"] = max(
                    _max_diff(_member(swept.mask, i), alone[i].mask) for i in range(members))
        swept = vmapped.end_epoch(swept)
        alone = [single.end_epoch(s) for s in alone]
        row = {"epoch": epoch + 1, "inner_label_flips": label_flips,
               "trigger_max_diff": trig,
               "mask_max_diff": [_max_diff(_member(swept.mask, i), alone[i].mask)
                                 for i in range(members)], **first}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # The key check: the sweep's own keys equal run_awm's.
    assert all(bool(jnp.all(jax.random.key_data(a) == jax.random.key_data(b)))
               for a, b in zip(alone_keys, epochs_keys))
    return {"checkpoint": checkpoint, "epochs": epochs, "rows": rows}


def perturbed(checkpoint: str, epochs: int, seed: int = 0, **overrides) -> dict:
    """Each member alone twice, the second with one mask entry lowered by one ulp (2**-24):
    the same growth as the sweep's drift shows that the dynamics amplify any rounding."""
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(metadata["dataset"]["name"])
    demo = DemoConfig()
    config = dataclasses.replace(demo.awm, outer_epochs=epochs, mask_selection="last",
                                 **overrides)
    spec = SweepSpec(grid={"alpha": [0.8, 0.9], "tau": [50.0, 100.0]}, seeds=[seed])
    clean, _ = draw_clean_subset(dataset.test, dataset.num_classes, member_keys(seed)["clean"],
                                 demo.clean)
    data = _validate_clean(clean, None)
    frozen = Frozen(variables["params"], variables["batch_stats"])
    steps = make_awm_steps(model, config, int(data["label"].shape[0]))
    single = _Driver(steps, config)
    key = member_keys(seed)["defense"]
    epochs_key = jax.random.split(key)[1]
    runs = []
    for member_config in spec.configs(config):
        hp = member_config.hparams()
        states = [steps.init(frozen.params, data, hp) for _ in range(2)]
        leaves, treedef = jax.tree_util.tree_flatten(states[1].mask)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(1.0 - 2.0 ** -24)
        states[1] = states[1].replace(mask=jax.tree_util.tree_unflatten(treedef, leaves))
        diffs = []
        for epoch in range(epochs):
            epoch_key = jax.random.fold_in(epochs_key, epoch)
            for i in range(2):
                states[i], _ = single.trigger_phase(states[i], frozen, data, epoch_key, hp)
                states[i], _ = single.mask_phase(states[i], frozen, data, epoch_key, hp)
            diffs.append(_max_diff(states[0].mask, states[1].mask))
        runs.append(diffs)
        print(json.dumps({"member": len(runs) - 1, "mask_max_diff_per_epoch": diffs}), flush=True)
    return {"checkpoint": checkpoint, "epochs": epochs, "overrides": overrides,
            "perturbation": "one mask entry -2**-24",
            "mask_max_diff_per_epoch": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo_models/seed0")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--perturb", action="store_true",
                        help="alone vs alone with a one-ulp mask perturbation, instead")
    parser.add_argument("--mask-optimizer", default=None, choices=("adam", "sgd"),
                        help="with --perturb: override the mask optimizer (and lr 1.0 for sgd)")
    args = parser.parse_args()
    if args.perturb:
        overrides = {} if args.mask_optimizer is None else {
            "mask_optimizer": args.mask_optimizer,
            **({"mask_lr": 1.0} if args.mask_optimizer == "sgd" else {})}
        result = perturbed(args.checkpoint, args.epochs, **overrides)
    else:
        result = drift(args.checkpoint, args.epochs)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
