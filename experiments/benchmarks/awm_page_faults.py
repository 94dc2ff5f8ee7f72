"""Page faults and kernel time of an AWM step (ResNet-18 width 64, 500 images, batch 128).

Prints the compiled step's temporary-buffer size, then, for two calls after a warm-up, the wall
seconds, minor page faults and user / system CPU seconds (``getrusage``) as JSON lines. Run it
under ``GLIBC_TUNABLES=...`` or ``strace -f -e trace=mmap,munmap`` to see where the faults come
from (perf_notes.md section 5).

    .venv/bin/python experiments/benchmarks/awm_page_faults.py [--mask-chunks auto|K] [--step trigger]

``--mask-chunks`` sets ``AWMConfig.mask_chunks`` (the gradient over K chunks of the batch;
default ``auto``, the library's rule);
``--step`` picks the mask step (default) or the trigger step.
"""

import argparse
import json
import os
import resource
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from performance import build_awm_case, mask_chunks_flag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mask-chunks", type=mask_chunks_flag, default="auto")
    parser.add_argument("--step", choices=("mask", "trigger"), default="mask")
    options = parser.parse_args()
    chunks = options.mask_chunks
    steps, _, hparams, frozen, data, state = build_awm_case("resnet18_full_500",
                                                            mask_chunks=chunks)
    args = (state, frozen, data, jax.random.key(1), hparams)
    step = jax.jit(steps.mask_step if options.step == "mask" else steps.trigger_step)
    compiled = step.lower(*args).compile()
    print(json.dumps({"step": options.step, "mask_chunks": chunks,
                      "mask_chunks_used": steps.mask_chunks_for(state, frozen, data, hparams),
                      "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}))
    jax.block_until_ready(step(*args))
    for _ in range(2):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(step(*args))
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"seconds": round(time.perf_counter() - start, 2),
                          "minor_faults": after.ru_minflt - before.ru_minflt,
                          "system_seconds": round(after.ru_stime - before.ru_stime, 2),
                          "user_seconds": round(after.ru_utime - before.ru_utime, 2)}))


if __name__ == "__main__":
    main()
