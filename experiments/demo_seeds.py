"""Runs ``awm-jax demo`` for several seeds and checks the Core issue's bar.

The bar: over seeds 0-4, median ASR (non-target) after AWM <= 0.10 with median clean-ACC drop
<= 0.05, and no seed worse than ASR 0.15 or drop 0.08.

    .venv/bin/python experiments/demo_seeds.py --seeds 0 1 2 3 4 \
        --out experiments/results/demo_seeds

Writes ``<out>/summary.json`` (per-seed before/after, wall time, the medians, pass/fail) and
``<out>/summary.md``; each seed's own report and plot go to ``<out>/seed<N>/``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from awm_jax.demo import run_demo
from awm_jax.serialization import library_versions, write_json_atomic

BAR = {"median_asr": 0.10, "median_drop": 0.05, "max_asr": 0.15, "max_drop": 0.08}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="experiments/results/demo_seeds")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        report = run_demo(seed=seed, out_dir=out / f"seed{seed}", progress=False)
        wall = time.perf_counter() - start
        rows.append({"seed": seed, "before": report["before"], "after": report["after"],
                     "drop": report["before"]["acc"] - report["after"]["acc"],
                     "train_seconds": report["training"]["seconds"],
                     "awm_seconds": report["seconds"], "wall_seconds": wall})
        print(f"seed {seed}: ACC {report['before']['acc']:.3f} -> {report['after']['acc']:.3f}, "
              f"ASR {report['before']['asr']:.3f} -> {report['after']['asr']:.3f}, "
              f"{wall:.1f} s", flush=True)
    asr = [r["after"]["asr"] for r in rows]
    drop = [r["drop"] for r in rows]
    stats = {"median_asr": statistics.median(asr), "median_drop": statistics.median(drop),
             "max_asr": max(asr), "max_drop": max(drop),
             "median_wall_seconds": statistics.median(r["wall_seconds"] for r in rows)}
    passed = all(stats[key] <= limit for key, limit in BAR.items())
    write_json_atomic(out / "summary.json", {"command": "python experiments/demo_seeds.py --seeds "
                                      + " ".join(map(str, args.seeds)), "bar": BAR,
                                      "stats": stats, "passed": passed, "seeds": rows,
                                      "versions": library_versions()})
    lines = ["| seed | ACC before | ACC after | ASR before | ASR after | ASR_all after | RA after "
             "| wall s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['seed']} | {b['acc']:.3f} | {a['acc']:.3f} | {b['asr']:.3f} | "
                     f"{a['asr']:.3f} | {a['asr_all']:.3f} | {a['ra']:.3f} | "
                     f"{r['wall_seconds']:.1f} |")
    lines.append("")
    lines.append(f"median ASR after {stats['median_asr']:.3f}, median ACC drop "
                 f"{stats['median_drop']:.3f}, max ASR {stats['max_asr']:.3f}, max drop "
                 f"{stats['max_drop']:.3f}, median wall {stats['median_wall_seconds']:.1f} s: "
                 f"{'meets' if passed else 'misses'} the bar {BAR}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
