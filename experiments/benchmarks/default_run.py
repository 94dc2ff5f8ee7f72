"""The whole default AWM run, as a user runs it, timed end to end.

The performance issue's target is "the whole default run, with final metrics": the official
defaults (ResNet-18 at full width, 500 clean images, batch 128, 5 inner passes, 20 outer
epochs) through :func:`awm_jax.pipeline.purify_model`, which draws the clean images, measures
ACC/ASR/RA before, runs AWM and measures them after on the rest of the 10,000-image test split.
This script times AWM, the rest, and their sum (``total_seconds``, from the first jitted
call to the final metrics; building the random model and dataset is excluded). With
``--track-epochs`` it also evaluates the test set after every epoch, as the official script
does and our default does not.

Weights and images are random (a 10,000-image test split, BadNets as the attack): the time of
every step does not depend on their values, and a fresh machine needs no dataset. Prints JSON.

    .venv/bin/python experiments/benchmarks/default_run.py --out experiments/results/default_run.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
from performance import _clean as random_images
from timing import allocator_env

from awm_jax.attacks.base import create_attack
from awm_jax.data.clean_subset import CleanDataConfig
from awm_jax.data.dataset import ImageDataset
from awm_jax.defenses.awm import AWMConfig
from awm_jax.machine import describe_machine
from awm_jax.models import create_model, init_variables
from awm_jax.pipeline import purify_model
from awm_jax.serialization import library_versions, write_json_atomic


def random_cifar_like(test_size: int) -> ImageDataset:
    """A 10-class 32x32x3 dataset of uniform noise (``performance.py``'s random images) with
    ``test_size`` test images (the train split, which the defense never reads, holds ten)."""
    return ImageDataset("random-cifar-like", random_images(10, seed=1), random_images(test_size),
                        tuple(f"class{i}" for i in range(10)))


def time_default_run(*, width: int, n_clean: int, outer_epochs: int, test_size: int,
                     track_epochs: bool, progress: bool) -> dict:
    """Runs :func:`purify_model` with AWM's defaults (``outer_epochs`` aside) and returns its
    wall time: in all, AWM's own (its clock excludes per-epoch evaluations), and the rest (the
    clean draw and the evaluations before, during and after)."""
    if outer_epochs < 1 or n_clean < 1 or width < 1:
        raise ValueError("width, n_clean and outer_epochs must be >= 1; got "
                         f"{width}, {n_clean}, {outer_epochs}.")
    if test_size <= n_clean:
        raise ValueError(f"test_size ({test_size}) must exceed n_clean ({n_clean}): the "
                         "clean images are drawn from the test split.")
    model = create_model("resnet18", 10, width=width)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    dataset = random_cifar_like(test_size)
    attack = create_attack("badnets")
    config = AWMConfig(outer_epochs=outer_epochs)
    start = time.perf_counter()
    report = purify_model(model, variables, dataset, attack, model_name="resnet18",
                          defense="awm", defense_config=config,
                          clean=CleanDataConfig(n_clean=n_clean), seed=0,
                          track_epochs=track_epochs, progress=progress)
    total = time.perf_counter() - start
    defense = report["seconds"]  # AWM's own clock: excludes the per-epoch evaluations
    return {
        "width": width, "n_clean": report["n_clean"], "eval_size": report["eval_size"],
        "outer_epochs": outer_epochs, "batch_size": config.batch_size,
        "inner_passes": config.inner_passes, "mask_chunks": config.mask_chunks,
        "track_epochs": track_epochs,
        "total_seconds": round(total, 1), "total_minutes": round(total / 60, 2),
        "awm_seconds": round(defense, 1),
        "awm_seconds_per_epoch": round(defense / outer_epochs, 1),
        "evaluation_and_other_seconds": round(total - defense, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "after": report["after"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: full)")
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--outer-epochs", type=int, default=AWMConfig().outer_epochs)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--track-epochs", action="store_true",
                        help="evaluate the test set after every epoch, as the official script")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        run = time_default_run(width=args.width, n_clean=args.n_clean,
                               outer_epochs=args.outer_epochs, test_size=args.test_size,
                               track_epochs=args.track_epochs, progress=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    result = {
        "benchmark": "default_run",
        "machine": {**describe_machine(), "allocator": allocator_env()},
        "versions": library_versions(),
        "command": " ".join(["python experiments/benchmarks/default_run.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "run": run,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
