"""The AWM epoch with glibc's malloc against jemalloc (``LD_PRELOAD``), alternating processes.

XLA CPU takes each step's temporary buffer (gigabytes for a ResNet-18 mask step) from malloc
and gives it back after the step; glibc hands such a block back to the kernel, so every step
faults its pages in afresh (perf_notes.md sections 5 and 8). jemalloc with page purging
switched off keeps them. Each run is one ``performance.py --skip ceiling,conv_impl,train_step,sweep``
process (same case, epochs and ``--mask-chunks``), glibc and jemalloc taking turns so that
drift in the machine's load hits both; prints and writes JSON.

    .venv/bin/python experiments/benchmarks/allocator.py \\
        --jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 --cases resnet18_full_500 \\
        --mask-chunks auto --rounds 2 --out experiments/results/allocator_zen5.json

jemalloc is ``apt-get install libjemalloc2`` on Debian/Ubuntu; ``--malloc-conf`` is what the
jemalloc runs set ``MALLOC_CONF`` to (default: never purge dirty or muzzy pages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from awm_jax.machine import describe_host

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
NO_PURGING = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def run_epoch(case: str, epochs: int, mask_chunks: str, env: dict[str, str]) -> dict:
    """One ``performance.py`` process timing ``case``; returns its ``awm_epoch`` entry."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "performance.json"
        subprocess.run([sys.executable, str(HERE / "performance.py"), "--skip",
                        "ceiling,conv_impl,train_step,sweep", "--cases", case, "--epochs",
                        str(epochs), "--mask-chunks", mask_chunks, "--out", str(out)],
                       cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())["awm_epoch"][case]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jemalloc", required=True, help="path of libjemalloc.so.2")
    parser.add_argument("--malloc-conf", default=NO_PURGING)
    parser.add_argument("--cases", default="resnet18_full_500")
    parser.add_argument("--mask-chunks", default="auto", help="comma list, e.g. auto,1")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each allocator")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not Path(args.jemalloc).is_file():
        parser.error(f"--jemalloc {args.jemalloc}: no such file (apt-get install libjemalloc2)")
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be at least 1")
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    allocators = {"glibc": base,
                  "jemalloc": {**base, "LD_PRELOAD": args.jemalloc,
                               "MALLOC_CONF": args.malloc_conf}}
    runs = []
    for case in filter(None, args.cases.split(",")):
        for chunks in filter(None, args.mask_chunks.split(",")):
            for round_index in range(args.rounds):
                for name, env in allocators.items():
                    epoch = run_epoch(case, args.epochs, chunks, env)
                    runs.append({"case": case, "mask_chunks": chunks, "round": round_index,
                                 "allocator": name, **epoch})
                    print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for run in runs:
        key = f"{run['case']} mask_chunks={run['mask_chunks']}"
        summary.setdefault(key, {}).setdefault(run["allocator"], []).append(
            run["epoch_seconds"])
    result = {"benchmark": "allocator",
              "machine": describe_host(),
              "command": " ".join(["python experiments/benchmarks/allocator.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "malloc_conf": args.malloc_conf, "epoch_seconds": summary, "runs": runs}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
