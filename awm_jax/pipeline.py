"""End-to-end jobs that the CLI and experiments call: purify a backdoored model and report.

Data flows one way: dataset -> attack -> backdoored model -> defender's clean draw -> defense
-> metrics -> ``report.json`` + plot. Keys: ``jax.random.key(seed)`` is split into ``clean``
(which images the defender holds, and their views), ``trigger`` (the triggered evaluation set)
and ``defense`` (the defense's own randomness).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from awm_jax.attacks.base import Attack, create_attack, triggered_test_set
from awm_jax.checkpoint import load_model, save_model
from awm_jax.data.clean_subset import CleanDataConfig, draw_clean_subset
from awm_jax.data.dataset import ImageDataset, Split
from awm_jax.data.sources import load_dataset
from awm_jax.defenses.base import get_defense
from awm_jax.eval.metrics import evaluate_backdoor, make_predict_fn
from awm_jax.eval.report import plot_history, summary_table, write_report
from awm_jax.models import check_images_fit

REPORT_NAME = "report.json"
PLOT_NAME = "history.png"


class DefenderDraw(NamedTuple):
    """What one seed gives a defense run: the defender's images, the evaluation set made of
    the rest of the test split, an evaluator on it, and the defense's key."""

    clean: Split
    evaluation: Split
    evaluate: Callable[[Any], dict[str, float]]  # variables -> ACC, ASR, ASR (all), RA
    defense_key: jax.Array


def draw_for_defense(model, dataset: ImageDataset, attack: Attack, clean: CleanDataConfig,
                     seed: int) -> DefenderDraw:
    """Splits ``jax.random.key(seed)`` into the clean draw, the triggered evaluation set and
    the defense's key (the module docstring's three keys), as every job here does."""
    clean_key, trigger_key, defense_key = jax.random.split(jax.random.key(seed), 3)
    clean_split, eval_split = draw_clean_subset(dataset.test, dataset.num_classes, clean_key,
                                                clean)
    triggered = triggered_test_set(eval_split, attack, trigger_key)
    predict = make_predict_fn(model)

    def evaluate(candidate):
        return evaluate_backdoor(functools.partial(predict, candidate), eval_split, triggered)

    return DefenderDraw(clean_split, eval_split, evaluate, defense_key)


def purify_model(model, variables, dataset: ImageDataset, attack: Attack, *,
                 model_name: str, defense: str = "awm", defense_config=None,
                 clean: CleanDataConfig = CleanDataConfig(), seed: int = 0,
                 out_dir: str | Path | None = None, track_epochs: bool = False,
                 progress: bool = True, extra: dict[str, Any] | None = None,
                 workdir: str | Path | None = None, checkpoint_every: int = 1,
                 resume: bool = False) -> dict[str, Any]:
    """Runs ``defense`` on a backdoored model and measures it before and after.

    Args:
      model, variables: the backdoored model.
      dataset: its dataset; the defender's images come from the test split and the rest of
        the test split is the evaluation set.
      attack: the attack the model carries (for ASR and RA).
      model_name: registered model name, for the report.
      defense: registered defense name.
      defense_config: the defense's config (its defaults when None).
      clean: how the defender's clean images are drawn.
      seed: root seed of the clean draw, the trigger and the defense.
      out_dir: if given, writes ``report.json``, the plot and the purified model there.
      track_epochs: evaluate the test metrics after every epoch (for the plot); costs time.
      progress: show progress bars.
      extra: more entries for the report.
      workdir: if given, the defense checkpoints its whole state there every
        ``checkpoint_every`` of its steps (every registered defense; see
        :mod:`awm_jax.defenses.checkpointing` for each one's step).
      checkpoint_every: the defense's steps between checkpoints.
      resume: continue from the newest checkpoint in ``workdir`` (a fresh start if none).

    Returns:
      The report dict (see :data:`awm_jax.eval.report.REPORT_KEYS`).

    Raises:
      ValueError: the dataset's images do not fit the model, or a bad clean-data or defense
        setting (each names the problem).
    """
    check_images_fit(model, variables, dataset.image_shape, f"{dataset.name} images")
    chosen = get_defense(defense)
    config = defense_config if defense_config is not None else chosen.config_class()
    clean_split, eval_split, evaluate, defense_key = draw_for_defense(model, dataset, attack,
                                                                      clean, seed)
    before = evaluate(variables)
    result = chosen.purify(model, variables, clean_split, defense_key, config,
                           num_classes=dataset.num_classes,
                           on_epoch=(lambda epoch, v: evaluate(v)) if track_epochs else None,
                           progress=progress,
                           **checkpoint_kwargs(chosen, workdir, checkpoint_every, resume))
    after = evaluate(result.variables)
    report = {
        "dataset": dataset.name, "model": model_name, "attack": attack.name,
        "attack_params": dict(attack.params), "defense": defense,
        "n_clean": len(clean_split), "clean_data": clean.to_dict(), "seed": seed,
        "config": config.to_dict(), "before": before, "after": after,
        "seconds": result.seconds, "eval_size": len(eval_split),
        "details": result.details, "history": result.history, **(extra or {}),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_report(out_dir / REPORT_NAME, report)
        if track_epochs:
            plot_history(result.history, out_dir / PLOT_NAME, before, after,
                         title=f"{defense.upper()} on {dataset.name} / {attack.name}")
        save_model(out_dir / "purified", model_name, _model_kwargs(model),
                   dataset.num_classes, dataset.image_shape, result.variables,
                   {"defense": defense, "config": config.to_dict(), "metrics": after,
                    "attack": {"name": attack.name, "params": dict(attack.params)},
                    "dataset": {"name": dataset.name}}, overwrite=True)
    return report


def checkpoint_kwargs(chosen, workdir, checkpoint_every: int, resume: bool) -> dict[str, Any]:
    """The ``purify`` keywords that checkpoint a run in ``workdir`` (none without it).

    Raises:
      ValueError: ``resume`` without ``workdir``, or a defense whose ``purify`` cannot
        checkpoint.
    """
    if workdir is None:
        if resume:
            raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
        return {}
    if "workdir" not in inspect.signature(chosen.purify).parameters:
        raise ValueError(f"the {chosen.name} defense does not support workdir/resume.")
    return {"workdir": str(workdir), "checkpoint_every": checkpoint_every, "resume": resume}


def _model_kwargs(model) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(model)} - {"parent", "name", "num_classes"}
    return {name: getattr(model, name) for name in sorted(fields)}


def purify_checkpoint(checkpoint: str | Path, *, dataset_source: str | None = None,
                      **kwargs) -> dict[str, Any]:
    """:func:`purify_model` on a model saved by ``train-backdoor`` (dataset and attack from its
    ``metadata.json``, unless ``dataset_source`` overrides the dataset)."""
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(dataset_source or metadata["dataset"]["name"])
    attack = create_attack(metadata["attack"]["name"], **metadata["attack"]["params"])
    return purify_model(model, variables, dataset, attack, model_name=metadata["model"]["name"],
                        extra={"checkpoint": str(checkpoint)}, **kwargs)


def print_summary(report: dict[str, Any]) -> str:
    """The before/after table of a report, as printed by the CLI."""
    table = summary_table({"before": report["before"], f"after {report['defense']}":
                           report["after"]})
    return (f"{report['defense'].upper()} on {report['dataset']} / {report['model']} / "
            f"{report['attack']} with {report['n_clean']} clean images, seed {report['seed']}, "
            f"{report['seconds']:.1f} s\n{table}")
