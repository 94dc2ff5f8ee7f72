"""Seconds per AWM epoch by ``mask_chunks`` for model/batch cases beyond ``performance.py``'s.

Each argument is ``CASE:K``; every pair builds its case with ``performance.build_awm_case``
(official defaults, random weights) and runs ``--epochs`` epochs in this process, printing the
seconds of each (the first includes compilation). Measured ``mask_chunks_zen5.json``:

    .venv/bin/python experiments/benchmarks/mask_chunks_cases.py w16_500:1 w16_500:2 w16_500:4 \
        w32_500:1 w32_500:2 w32_500:4 vgg_oneshot:1 vgg_oneshot:2 w16_oneshot:1 w16_oneshot:2
"""

from __future__ import annotations

import argparse
import time

import jax
from performance import _Driver, build_awm_case

CASES = {
    # name: (model, kwargs, n clean, batch), as performance.AWM_CASES
    "w16_500": ("resnet18", {"width": 16}, 500, 128),
    "w32_500": ("resnet18", {"width": 32}, 500, 128),
    "vgg_oneshot": ("small_vgg", {}, 100, 32),
    "w16_oneshot": ("resnet18", {"width": 16}, 100, 32),
}


def case_and_chunks(text: str) -> tuple[str, int]:
    name, _, chunks = text.partition(":")
    if name not in CASES or not chunks.isdigit() or int(chunks) < 1:
        raise argparse.ArgumentTypeError(f"expected CASE:K with CASE in {sorted(CASES)} and "
                                         f"K >= 1; got {text!r}")
    return name, int(chunks)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=case_and_chunks, metavar="CASE:K")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    for name, chunks in args.runs:
        steps, config, hparams, frozen, data, state = build_awm_case(
            None, mask_chunks=chunks, spec=CASES[name])
        driver = _Driver(steps, config)
        seconds = []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            key = jax.random.key(epoch)
            state, _ = driver.trigger_phase(state, frozen, data, key, hparams)
            state, metrics = driver.mask_phase(state, frozen, data, key, hparams)
            jax.block_until_ready(metrics)
            seconds.append(round(time.perf_counter() - start, 2))
        print(name, chunks, seconds, flush=True)


if __name__ == "__main__":
    main()
