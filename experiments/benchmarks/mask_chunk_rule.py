"""What ``AWMConfig.mask_chunks="auto"`` picks, and how its estimate compares with XLA's buffer.

For each case (model, clean images, batch) prints one JSON line: the estimated temporary buffer
of the whole-batch mask gradient (:mod:`awm_jax.defenses.awm.chunking`, traced, not compiled),
the chunks the rule picks on this machine's default device, the seconds the estimate took and,
with ``--compile``, the buffer XLA assigns to the whole-batch mask step
(``memory_analysis().temp_size_in_bytes``) and its ratio to the jaxpr's summed intermediates,
which calibrates ``JAXPR_TO_BUFFER``.

    .venv/bin/python experiments/benchmarks/mask_chunk_rule.py [--compile] [--out FILE]
"""

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from performance import AWM_CASES, build_awm_case

from awm_jax.defenses.awm.chunking import JAXPR_TO_BUFFER, chunk_budget_bytes
from awm_jax.serialization import library_versions, write_json_atomic

CASES = {
    **AWM_CASES,
    "small_cnn_oneshot_100": ("small_cnn", {}, 100, 32),
    "resnet18_w16_oneshot_100": ("resnet18", {"width": 16}, 100, 32),
    "resnet18_w16_500": ("resnet18", {"width": 16}, 500, 128),
    "resnet18_w32_500": ("resnet18", {"width": 32}, 500, 128),
}


def measure(case: str, compile_whole: bool) -> dict:
    steps, _, hparams, frozen, data, state = build_awm_case(case, mask_chunks="auto",
                                                            spec=CASES[case])
    start = time.perf_counter()
    chunks = steps.mask_chunks_for(state, frozen, data, hparams)
    seconds = time.perf_counter() - start
    estimate = steps.mask_buffer_bytes(state, frozen, data, hparams)
    name, kwargs, count, batch = CASES[case]
    row = {"case": case, "model": name, "model_kwargs": kwargs, "n_clean": count,
           "batch_size": batch, "estimate_mb": round(estimate / 1e6, 1), "chunks": chunks,
           "estimate_seconds": round(seconds, 2)}
    if compile_whole:
        whole = build_awm_case(case, mask_chunks=1, spec=CASES[case])
        args = (whole.state, whole.frozen, whole.data, jax.random.key(1), whole.hparams)
        compiled = jax.jit(whole.steps.mask_step).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        row["xla_temp_mb"] = round(temp / 1e6, 1)
        # XLA's buffer over the jaxpr's summed intermediates (estimate / JAXPR_TO_BUFFER).
        row["xla_over_jaxpr"] = round(temp * JAXPR_TO_BUFFER / estimate, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--compile", action="store_true",
                        help="also compile each whole-batch mask step for XLA's buffer size")
    parser.add_argument("--out")
    options = parser.parse_args()
    budget = chunk_budget_bytes()
    rows = []
    for case in options.cases:
        rows.append(measure(case, options.compile))
        print(json.dumps(rows[-1]), flush=True)
    if options.out:
        write_json_atomic(options.out, {
            "command": " ".join(["python", *sys.argv]), "device": str(jax.devices()[0]),
            "budget_bytes": budget, "jaxpr_to_buffer": JAXPR_TO_BUFFER,
            "versions": library_versions(), "cases": rows})


if __name__ == "__main__":
    main()
