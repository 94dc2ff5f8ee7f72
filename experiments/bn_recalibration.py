"""Does re-estimating BatchNorm statistics on the defender's images after one-shot AWM recover
clean accuracy, and does the backdoor stay away?

Runs AWM (``cifar10_one_shot`` preset, plus ``--set FIELD=JSON`` changes) on a zoo model with
the reproduction study's one-shot clean data (one image per class and 9 crops of 50-100% of
it, drawn as ``awm-jax compare --seed S`` draws them) and evaluates four models on the same
evaluation set: the backdoored one, AWM's, and each after replacing every BatchNorm layer's
running statistics by the statistics of the 100 clean images (a train-mode forward pass).

    .venv/bin/python experiments/bn_recalibration.py --attack badnets --seed 0 \
        --out experiments/results/sweep/bn_recalibration_badnets_seed0.json
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from awm_jax.compare import load_backdoored
from awm_jax.data.clean_subset import clean_data_config
from awm_jax.defenses.awm import AWMConfig, run_awm
from awm_jax.models.base import apply_model
from awm_jax.pipeline import draw_for_defense
from awm_jax.serialization import library_versions, write_json_atomic


def recalibrated(model, variables, images):
    """``variables`` with every BatchNorm's running mean and variance replaced by the batch
    statistics of ``images`` (float32[N, H, W, C]) in a train-mode forward pass.

    A train-mode pass returns ``momentum * old + (1 - momentum) * batch``; running it from
    all-zero and all-one statistics recovers ``batch`` whatever each layer's momentum is.
    """
    def updated(fill):
        start = jax.tree.map(lambda x: jnp.full_like(x, fill), variables["batch_stats"])
        return apply_model(model, variables["params"], start, images, train=True)[1]

    from_zero, from_one = updated(0.0), updated(1.0)
    batch = jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)
    return {"params": variables["params"], "batch_stats": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON")
    parser.add_argument("--out")
    options = parser.parse_args()
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in options.set)}
    model, variables, dataset, attack, _ = load_backdoored(
        f"runs/zoo/{options.dataset}/{options.attack}")
    clean, evaluation, evaluate, defense_key = draw_for_defense(
        model, dataset, attack, clean_data_config(one_shot=True, crop_scale=(0.5, 1.0)),
        options.seed)
    config = AWMConfig.preset("cifar10_one_shot", **changes)
    start = time.perf_counter()
    purified = run_awm(model, variables, clean, config, defense_key,
                       num_classes=dataset.num_classes, progress=False).variables
    seconds = time.perf_counter() - start
    images = jnp.asarray(clean.images)
    result = {"command": " ".join(["python", *sys.argv]), "attack": options.attack,
              "seed": options.seed, "awm_config": config.to_dict(), "n_clean": len(clean),
              "eval_size": len(evaluation), "awm_seconds": round(seconds, 1),
              "none": evaluate(variables),
              "none_recalibrated": evaluate(recalibrated(model, variables, images)),
              "awm": evaluate(purified),
              "awm_recalibrated": evaluate(recalibrated(model, purified, images)),
              "versions": library_versions()}
    print(json.dumps(result, indent=1))
    if options.out:
        write_json_atomic(options.out, result)


if __name__ == "__main__":
    main()
