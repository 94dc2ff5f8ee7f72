"""The performance benchmark: the machine's ceiling, AWM epochs, and vmapped sweeps, in one run.

Prints one JSON object (and writes it with ``--out``) so that every ratio compares numbers
measured in the same process on the same machine:

* ``ceiling``: jitted float32 and bfloat16 matmuls and a ResNet-sized 3x3 convolution
  (batch 128, 32x32x64 -> 64), forward and forward+backward, in GFLOP/s.
* ``awm_epoch``: one AWM outer epoch (inner trigger phase + outer mask phase, the official
  defaults) for ResNet-18 at full width (500 clean images, batch 128, 5 inner passes) and for
  the small VGG in the one-shot setting (100 images, batch 32): seconds per epoch (median of
  the timed epochs after a warm-up epoch), compile time of the two steps, images per second,
  XLA's FLOP count of the epoch and the achieved GFLOP/s as a fraction of the matmul ceiling,
  and peak RSS.
* ``conv_impl``: the same AWM epochs with the models' ``conv_impl="lax"`` and ``"fast"``
  (:mod:`awm_jax.perf.fast_conv`), built in one process and timed interleaved (one warm-up call
  of each jitted step, then epochs round-robin), and one ResNet-18 width-16 training step
  (batch 128, train-mode BatchNorm, SGD) with each implementation; ratios lax / fast.
* ``sweep``: K = 1, 2, 4, 8, 16 members of a small-VGG one-shot sweep vmapped in one program vs
  K sequential single runs, wall time and speed-up.

Timings use random weights and random images: speed does not depend on their values.

    .venv/bin/python experiments/benchmarks/performance.py --out \
        experiments/results/performance.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import allocator_env, time_interleaved

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps
from awm_jax.defenses.awm.runner import _Driver, run_awm
from awm_jax.machine import describe_machine
from awm_jax.models import create_model, init_variables
from awm_jax.serialization import library_versions, write_json_atomic
from awm_jax.sweep.runner import run_sweep
from awm_jax.sweep.spec import SweepSpec, member_keys
from awm_jax.training.state import create_train_state
from awm_jax.training.steps import make_train_step

AWM_CASES = {
    # name: (model, kwargs, n clean, batch)
    "resnet18_full_500": ("resnet18", {"width": 64}, 500, 128),
    "small_vgg_oneshot_100": ("small_vgg", {}, 100, 32),
}


def mask_chunks_flag(text: str) -> int | str:
    """``--mask-chunks``: ``auto`` or a positive integer."""
    return text if text == "auto" else int(text)


def _time(fn, *args, repeats: int = 5) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def ceiling() -> dict:
    """Matmul and convolution throughput of this machine under XLA, GFLOP/s."""
    out = {}
    n = 2048
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype)
        matmul = jax.jit(lambda x, y: x @ y)
        out[f"matmul_{dtype}_gflops"] = round(2 * n ** 3 / _time(matmul, a, a) / 1e9, 1)
    images = jnp.ones((128, 32, 32, 64), jnp.float32)
    kernel = jnp.ones((3, 3, 64, 64), jnp.float32) * 0.01

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    flops = 2 * 128 * 32 * 32 * 64 * 64 * 9
    out["conv3x3_forward_gflops"] = round(flops / _time(jax.jit(conv), images, kernel) / 1e9, 1)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
    # forward + input gradient + weight gradient: three convolutions of the same size.
    out["conv3x3_forward_backward_gflops"] = round(3 * flops / _time(grad, images, kernel) / 1e9,
                                                   1)
    return out


def _clean(count: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.uniform(0, 1, (count, 32, 32, 3)).astype(np.float32),
                 (np.arange(count) % 10).astype(np.int32))


def _flops(jitted, *args, compile: bool = True) -> float | None:
    """XLA's FLOP count of ``jitted(*args)``, compiled or (``compile=False``) as lowered."""
    try:
        lowered = jitted.lower(*args)
        analysis = (lowered.compile() if compile else lowered).cost_analysis()
    except Exception:  # cost analysis is backend-specific; report None rather than fail.
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0)) or None


class AWMCase(NamedTuple):
    """The AWM steps of one ``AWM_CASES`` entry with the official defaults, ready to call."""

    steps: Any
    config: AWMConfig
    hparams: Any
    frozen: Frozen
    data: dict
    state: Any


def build_awm_case(case: str, conv_impl: str = "fast", mask_chunks: int | str = "auto",
                   spec: tuple | None = None) -> AWMCase:
    """Random weights and images for ``case`` (or for ``spec``, a ``(model, kwargs, n clean,
    batch)`` tuple like ``AWM_CASES``' values); ``conv_impl`` goes in the config, which
    ``make_awm_steps`` applies to the model, and so does ``mask_chunks``."""
    name, kwargs, count, batch = spec or AWM_CASES[case]
    model = create_model(name, 10, **kwargs)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    clean = _clean(count)
    data = {"image": jnp.asarray(clean.images), "label": jnp.asarray(clean.labels)}
    config = AWMConfig(batch_size=batch, conv_impl=conv_impl, mask_chunks=mask_chunks)
    steps = make_awm_steps(model, config, count)
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    return AWMCase(steps, config, hparams, frozen, data, steps.init(frozen.params, data, hparams))


def awm_epoch(case: str, epochs: int, matmul_gflops: float,
              mask_chunks: int | str = "auto") -> dict:
    """Seconds per AWM outer epoch of ``case`` with the official defaults (and ``mask_chunks``,
    which changes memory and speed, not results), and what it achieves."""
    name, kwargs, count, batch = AWM_CASES[case]
    steps, config, hparams, frozen, data, state = build_awm_case(case, mask_chunks=mask_chunks)
    driver = _Driver(steps, config)
    key = jax.random.key(1)
    start = time.perf_counter()
    trigger_flops = _flops(driver.trigger_step, state, frozen, data, key, hparams)
    mask_flops = _flops(driver.mask_step, state, frozen, data, key, hparams)
    compile_seconds = time.perf_counter() - start  # the AOT compile of both steps
    seconds = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        epoch_key = jax.random.key(epoch)
        state, _ = driver.trigger_phase(state, frozen, data, epoch_key, hparams)
        state, metrics = driver.mask_phase(state, frozen, data, epoch_key, hparams)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    epoch_seconds = statistics.median(seconds[1:])
    steps_per_phase = steps.steps_per_phase
    epoch_flops = None
    if trigger_flops and mask_flops:
        epoch_flops = steps_per_phase * (trigger_flops + mask_flops)
    reference_flops = _reference_epoch_flops(case, mask_chunks)
    result = {
        "model": name, "model_kwargs": kwargs, "n_clean": count, "batch_size": batch,
        "steps_per_phase": steps_per_phase, "mask_chunks": mask_chunks,
        "mask_chunks_used": steps.mask_chunks_for(state, frozen, data, hparams),
        "epoch_seconds": round(epoch_seconds, 3),
        "first_epoch_seconds": round(seconds[0], 3),
        "compile_seconds": round(compile_seconds, 2),
        # images through the network per second, counting both phases' batches.
        "images_per_second": round(2 * steps_per_phase * batch / epoch_seconds, 1),
        "epoch_gflop": None if reference_flops is None else round(reference_flops / 1e9, 1),
        "epoch_gflop_as_compiled": None if epoch_flops is None else round(epoch_flops / 1e9, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if reference_flops:
        achieved = reference_flops / epoch_seconds / 1e9
        result["achieved_gflops"] = round(achieved, 1)
        result["fraction_of_matmul_ceiling"] = round(achieved / matmul_gflops, 3)
    return result


def _reference_epoch_flops(case: str, mask_chunks: int | str) -> float | None:
    """One epoch's FLOPs as XLA counts the ``conv_impl="lax"`` steps (uncompiled HLO).

    The count of the compiled ``fast`` steps depends on which weight-gradient formulation the
    rule picks (the tap matmuls multiply the padding's zeros, lax's convolution skips them:
    15,481 against 14,948 GFLOP for the ResNet-18 epoch), so the achieved GFLOP/s is reported
    against this fixed count of the model's own arithmetic instead.
    """
    steps, config, hparams, frozen, data, state = build_awm_case(
        case, conv_impl="lax", mask_chunks=mask_chunks)
    driver = _Driver(steps, config)
    key = jax.random.key(1)
    counts = [_flops(step, state, frozen, data, key, hparams, compile=False)
              for step in (driver.trigger_step, driver.mask_step)]
    return steps.steps_per_phase * sum(counts) if all(counts) else None


def _warm_awm(driver: _Driver, state, frozen, data, hparams):
    """Compiles every jitted step of one epoch by calling it once; returns the new state."""
    key = jax.random.key(123)
    state = driver.begin_epoch(state, frozen, data, hparams)
    state, _ = driver.trigger_step(state, frozen, data, key, hparams)
    state = driver.end_trigger_phase(state, hparams)
    state, metrics = driver.mask_step(state, frozen, data, key, hparams)
    state = driver.end_epoch(state)
    jax.block_until_ready(metrics)
    return state


def awm_epoch_conv_impls(case: str, epochs: int, impls: list[str]) -> dict:
    """Seconds per AWM epoch of ``case`` for each conv implementation, epochs interleaved."""
    name, kwargs, count, batch = AWM_CASES[case]
    base = create_model(name, 10, **kwargs)
    variables = init_variables(base, jax.random.key(0), (32, 32, 3))
    clean = _clean(count)
    data = {"image": jnp.asarray(clean.images), "label": jnp.asarray(clean.labels)}
    hparams = AWMConfig(batch_size=batch).hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    runs, compile_seconds = {}, {}
    for impl in impls:
        # make_awm_steps runs the model with config.conv_impl, so the config must carry it.
        config = AWMConfig(batch_size=batch, conv_impl=impl)
        steps = make_awm_steps(base, config, count)
        driver = _Driver(steps, config)
        start = time.perf_counter()
        state = _warm_awm(driver, steps.init(frozen.params, data, hparams), frozen, data, hparams)
        compile_seconds[impl] = round(time.perf_counter() - start, 2)
        runs[impl] = [driver, state]
    seconds = {impl: [] for impl in impls}
    for epoch in range(epochs):
        epoch_key = jax.random.key(epoch)
        for impl in impls:
            driver, state = runs[impl]
            start = time.perf_counter()
            state, _ = driver.trigger_phase(state, frozen, data, epoch_key, hparams)
            state, metrics = driver.mask_phase(state, frozen, data, epoch_key, hparams)
            jax.block_until_ready(metrics)
            seconds[impl].append(round(time.perf_counter() - start, 2))
            runs[impl][1] = state
            print(json.dumps({"case": case, "conv_impl": impl, "epoch": epoch,
                              "seconds": seconds[impl][-1]}), flush=True)
    median = {impl: round(statistics.median(v), 2) for impl, v in seconds.items()}
    result = {"epoch_seconds": median, "all_epoch_seconds": seconds,
              "warmup_seconds": compile_seconds, "steps_per_phase": runs[impls[0]][0].steps
              .steps_per_phase}
    if "lax" in median:
        result["lax_over"] = {impl: round(median["lax"] / v, 2) for impl, v in median.items()}
    return result


def train_step_conv_impls(width: int, batch: int, reps: int, impls: list[str]) -> dict:
    """Seconds per ResNet-18 training step (train-mode BN, SGD) per conv implementation."""
    rng = np.random.default_rng(0)
    batch_data = {"image": jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)), jnp.float32),
                  "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
    tx = optax.sgd(0.01, momentum=0.9)
    runs = {}
    for impl in impls:
        model = create_model("resnet18", 10, width=width, conv_impl=impl)
        step = jax.jit(make_train_step(model, tx))
        runs[impl] = (step, create_train_state(model, tx, jax.random.key(0), (32, 32, 3)))
    key = jax.random.key(1)
    fns = {impl: (lambda s=step, st=state: s(st, batch_data, key)[1])
           for impl, (step, state) in runs.items()}
    median = {impl: round(t, 3) for impl, t in time_interleaved(fns, reps).items()}
    result = {"width": width, "batch": batch, "reps": reps, "step_seconds": median}
    if "lax" in median:
        result["lax_over"] = {impl: round(median["lax"] / v, 2) for impl, v in median.items()}
    return result


def sweep_speedup(members: list[int], epochs: int, member_loops: list[str]) -> list[dict]:
    """K members of the small-VGG one-shot setting in one sweep (per ``member_loop``: vmapped,
    or each member's jitted step in turn) vs K sequential ``run_awm`` runs."""
    name, kwargs, count, batch = AWM_CASES["small_vgg_oneshot_100"]
    model = create_model(name, 10, **kwargs)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    clean = _clean(count)
    config = AWMConfig(batch_size=batch, tau=100.0, outer_epochs=epochs)
    rows = []
    for k in members:
        spec = SweepSpec(grid={"alpha": list(np.linspace(0.5, 0.95, k))}, seeds=[0])
        row = {"members": k}
        for member_loop in member_loops:
            start = time.perf_counter()
            swept = run_sweep(model, variables, clean, config, spec, progress=False,
                              member_loop=member_loop)
            jax.block_until_ready(jax.tree_util.tree_leaves(swept.masks))
            row[f"{member_loop}_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        for member_config in spec.configs(config):
            run_awm(model, variables, clean, member_config, member_keys(0)["defense"],
                    progress=False)
        row["sequential_seconds"] = round(time.perf_counter() - start, 2)
        for member_loop in member_loops:
            row[f"{member_loop}_speedup"] = round(
                row["sequential_seconds"] / row[f"{member_loop}_seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SECTIONS = ("ceiling", "awm_epoch", "conv_impl", "train_step", "sweep")


def _merged(path: str | None, result: dict, skip: set[str]) -> dict:
    """``path``'s results with the sections of ``result`` that ran replacing theirs; every
    section records the command (and machine) that measured it under ``"measured_by"``."""
    if path is None or not os.path.isfile(path):
        raise SystemExit(f"--update needs an existing --out file; got {path!r}")
    with open(path) as handle:
        merged = json.load(handle)
    ran = [name for name in SECTIONS if name not in skip and name in result]
    by = merged.setdefault("measured_by", {})
    for name in SECTIONS:
        by.setdefault(name, {"command": merged.get("command"), "versions": merged.get("versions")})
    for name in ran:
        merged[name] = result[name]
        by[name] = {"command": result["command"], "versions": result["versions"],
                    "machine": result["machine"]}
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(AWM_CASES))
    parser.add_argument("--epochs", type=int, default=2, help="timed AWM epochs per case")
    parser.add_argument("--mask-chunks", type=mask_chunks_flag, default="auto",
                        help="awm_epoch: AWMConfig.mask_chunks, 'auto' or K (the mask gradient "
                             "in K chunks) [default: auto]")
    parser.add_argument("--members", default="1,2,4,8,16")
    parser.add_argument("--sweep-epochs", type=int, default=3)
    parser.add_argument("--skip", default="",
                        help="comma list of ceiling,awm_epoch,conv_impl,train_step,sweep")
    parser.add_argument("--conv-impls", default="lax,fast",
                        help="conv implementations compared by conv_impl and train_step")
    parser.add_argument("--conv-impl-cases", default=None,
                        help="AWM cases of the conv_impl comparison (default: --cases)")
    parser.add_argument("--train-reps", type=int, default=3)
    parser.add_argument("--member-loops", default="vmap,loop",
                        help="sweep: the run_sweep member_loop modes timed against sequential")
    parser.add_argument("--out", default=None)
    parser.add_argument("--update", action="store_true",
                        help="merge the sections run into the existing --out file (each "
                             "section keeps the command that measured it)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result = {"machine": {**describe_machine(), "allocator": allocator_env()},
              "versions": library_versions(), "command": "python "
              "experiments/benchmarks/performance.py " + " ".join(os.sys.argv[1:])}
    result["ceiling"] = ceiling() if "ceiling" not in skip else {}
    print(json.dumps(result["ceiling"]), flush=True)
    matmul = result["ceiling"].get("matmul_float32_gflops", float("nan"))
    if "awm_epoch" not in skip:
        result["awm_epoch"] = {}
        for case in filter(None, args.cases.split(",")):
            result["awm_epoch"][case] = awm_epoch(case, args.epochs, matmul, args.mask_chunks)
            print(json.dumps({case: result["awm_epoch"][case]}), flush=True)
    impls = list(filter(None, args.conv_impls.split(",")))
    if "conv_impl" not in skip:
        result["conv_impl"] = {}
        cases = args.conv_impl_cases if args.conv_impl_cases is not None else args.cases
        for case in filter(None, cases.split(",")):
            result["conv_impl"][case] = awm_epoch_conv_impls(case, args.epochs, impls)
            print(json.dumps({case: result["conv_impl"][case]}), flush=True)
    if "train_step" not in skip:
        result["train_step"] = train_step_conv_impls(16, 128, args.train_reps, impls)
        print(json.dumps({"train_step": result["train_step"]}), flush=True)
    if "sweep" not in skip:
        result["sweep"] = sweep_speedup([int(k) for k in args.members.split(",")],
                                        args.sweep_epochs,
                                        list(filter(None, args.member_loops.split(","))))
    if args.update:
        result = _merged(args.out, result, skip)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
