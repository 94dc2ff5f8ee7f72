"""Python-driven jitted steps vs ``lax.scan`` phases for AWM epochs: which is faster here?

Prints one JSON object: for each model, seconds per AWM epoch (median of the timed epochs,
after a warm-up epoch that compiles) in both loop modes, the compile time, and the ratio.

    .venv/bin/python experiments/benchmarks/awm_loop_modes.py \
        > experiments/results/awm_loop_modes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps
from awm_jax.defenses.awm.runner import _Driver
from awm_jax.machine import describe_machine
from awm_jax.serialization import library_versions
from awm_jax.models import create_model, init_variables

CASES = {
    # name: (model, kwargs, image shape, n clean, batch)
    "small_cnn_digits16_oneshot": ("small_cnn", {"features": (16, 32)}, (16, 16, 1), 100, 32),
    "small_vgg_cifar_oneshot": ("small_vgg", {}, (32, 32, 3), 100, 32),
    "resnet18_w16_cifar_500": ("resnet18", {"width": 16}, (32, 32, 3), 500, 128),
}


def time_mode(case: str, loop: str, epochs: int) -> dict:
    name, kwargs, shape, count, batch = CASES[case]
    model = create_model(name, 10, **kwargs)
    variables = init_variables(model, jax.random.key(0), shape)
    rng = np.random.default_rng(0)
    clean = Split(rng.uniform(0, 1, (count, *shape)).astype(np.float32),
                  rng.integers(0, 10, count).astype(np.int32))
    data = {"image": jax.numpy.asarray(clean.images), "label": jax.numpy.asarray(clean.labels)}
    config = AWMConfig(batch_size=batch, tau=100.0, loop=loop)
    steps = make_awm_steps(model, config, count)
    driver = _Driver(steps, config)
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    state = steps.init(frozen.params, data, hparams)
    seconds = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        key = jax.random.key(epoch)
        state, _ = driver.trigger_phase(state, frozen, data, key, hparams)
        state, metrics = driver.mask_phase(state, frozen, data, key, hparams)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[1:])
    return {"first_epoch_s": round(seconds[0], 3), "epoch_s": round(median, 3),
            "compile_s_estimate": round(seconds[0] - median, 3),
            "steps_per_phase": steps.steps_per_phase, "batch": steps.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after warm-up")
    args = parser.parse_args()
    results = {}
    for case in args.cases.split(","):
        modes = {loop: time_mode(case, loop, args.epochs) for loop in ("python", "scan")}
        modes["scan_over_python"] = round(modes["scan"]["epoch_s"] / modes["python"]["epoch_s"], 2)
        results[case] = modes
    print(json.dumps({"benchmark": "awm_loop_modes", "machine": describe_machine(),
                      "versions": library_versions(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
