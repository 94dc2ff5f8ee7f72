"""Page faults and kernel time of AWM's mask step (ResNet-18 width 64, 500 images, batch 128).

Prints the compiled step's temporary-buffer size, then, for two calls after a warm-up, the wall
seconds, minor page faults and user / system CPU seconds (``getrusage``) as JSON lines. Run it
under ``GLIBC_TUNABLES=...`` or ``strace -f -e trace=mmap,munmap`` to see where the faults come
from (perf_notes.md section 5).

    .venv/bin/python experiments/benchmarks/awm_page_faults.py
"""

import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from performance import AWM_CASES, _clean

from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps
from awm_jax.models import create_model, init_variables


def main() -> None:
    name, kwargs, count, batch = AWM_CASES["resnet18_full_500"]
    model = create_model(name, 10, **kwargs)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    clean = _clean(count)
    data = {"image": jnp.asarray(clean.images), "label": jnp.asarray(clean.labels)}
    config = AWMConfig(batch_size=batch)
    steps = make_awm_steps(model, config, count)
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    state = steps.init(frozen.params, data, hparams)
    args = (state, frozen, data, jax.random.key(1), hparams)
    step = jax.jit(steps.mask_step)
    compiled = step.lower(*args).compile()
    print(json.dumps({"temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
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
