"""A sweep end to end: clean draw per seed, vmapped defense, vmapped evaluation, table, plots.

The defense is ``spec.defense``: AWM (:func:`~awm_jax.sweep.runner.run_sweep`) or a baseline,
FT or ANP (:func:`~awm_jax.sweep.baselines.run_baseline_sweep`); checkpointing (``workdir``) is
AWM only.

Each seed's key is split as in :func:`awm_jax.pipeline.purify_model` into ``(clean, trigger,
defense)``: the seed fixes the defender's images and the evaluation split, so members are grouped
by seed and each group runs as one vmapped sweep over its hyperparameters (the groups have the
same shapes, so the steps compile once). Member ``i`` therefore equals ``awm-jax purify`` with
the same seed and settings.

With a ``workdir``, seed group ``s`` checkpoints into ``<workdir>/seed_<s>/``
(:mod:`awm_jax.sweep.checkpointing`); ``resume`` continues the group that was running and reloads
the finished ones. In a sweep spanning processes every process runs the same groups and gets the
whole results; only process 0 writes the table and plots.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax

from awm_jax.attacks.base import Attack, create_attack, triggered_test_set
from awm_jax.checkpoint import load_model
from awm_jax.data.clean_subset import CleanDataConfig, draw_clean_subset
from awm_jax.data.dataset import ImageDataset
from awm_jax.data.sources import load_dataset
from awm_jax.defenses.awm.mask import mask_statistics
from awm_jax.eval.metrics import evaluate_backdoor, make_predict_fn
from awm_jax.sweep import report as report_lib
from awm_jax.sweep.adapters import get_adapter
from awm_jax.sweep.baselines import run_baseline_sweep
from awm_jax.sweep.evaluate import evaluate_members
from awm_jax.sweep.runner import resolve_member_loop, run_sweep
from awm_jax.sweep.spec import SweepSpec, member_keys

METRICS = ("acc", "asr", "asr_all", "ra")


def sweep_model(model, variables, dataset: ImageDataset, attack: Attack, config,
                spec: SweepSpec, *, clean: CleanDataConfig | None = None,
                chunk_size: int | None = None, mesh=None, out_dir: str | Path | None = None,
                progress: bool = True, extra: dict[str, Any] | None = None,
                workdir: str | os.PathLike | None = None, checkpoint_every: int = 1,
                resume: bool = False, member_loop: str = "auto") -> dict[str, Any]:
    """Runs the sweep ``spec`` of ``spec.defense`` on a backdoored model and evaluates every
    member.

    ``config`` is the defense's config (:class:`AWMConfig`, :class:`FTConfig`,
    :class:`ANPConfig`). ``workdir``, ``checkpoint_every`` and ``resume`` (AWM only)
    checkpoint each seed group's :func:`run_sweep` in ``<workdir>/seed_<seed>``; ``clean``
    defaults to ``CleanDataConfig()``; ``member_loop`` (AWM only) is :func:`run_sweep`'s.

    Returns:
      ``{"rows": [...], "defense", "config", "spec", "seconds", ...}``; each row holds
      ``member``, ``seed``, the swept hparams, the after-defense metrics, ``before_<metric>``
      and ``final_loss``; AWM rows add ``mask_mean`` and ``selected_epoch``, baseline rows
      ``diverged`` (and ANP's ``channels``, ``pruned``, ``mask_mean``). With ``out_dir``, also
      writes the table and plots there.

    Raises:
      ValueError: ``resume`` without ``workdir``, ``workdir`` for a baseline sweep, or what the
        runners raise.
    """
    clean = clean if clean is not None else CleanDataConfig()
    if resume and workdir is None:
        raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
    if spec.defense != "awm" and (workdir is not None or resume):
        raise ValueError(f"--workdir/--resume (checkpointing) is supported for AWM sweeps "
                         f"only; run the {spec.defense} sweep without them.")
    rows: list[dict[str, Any]] = []
    sweep_seconds = 0.0
    start = time.perf_counter()
    predict = make_predict_fn(model)
    for seed in spec.seeds:
        keys = member_keys(seed)
        clean_split, eval_split = draw_clean_subset(dataset.test, dataset.num_classes,
                                                    keys["clean"], clean)
        triggered = triggered_test_set(eval_split, attack, keys["trigger"])
        before = evaluate_backdoor(lambda x: predict(variables, x), eval_split, triggered)
        group = dataclasses.replace(spec, seeds=[seed])
        runner = _awm_group if spec.defense == "awm" else _baseline_group
        seconds, after, extras = runner(
            model, variables, clean_split, eval_split, triggered, config, group,
            chunk_size=chunk_size, mesh=mesh, num_classes=dataset.num_classes,
            progress=progress,
            workdir=None if workdir is None else Path(workdir) / f"seed_{seed}",
            checkpoint_every=checkpoint_every, resume=resume, member_loop=member_loop)
        sweep_seconds += seconds
        for member, metrics, more in zip(group.members(), after, extras):
            rows.append({"member": len(rows), **member, **metrics,
                         **{f"before_{k}": before[k] for k in METRICS}, **more})
    table = {"dataset": dataset.name, "attack": attack.name, "defense": spec.defense,
             "config": config.to_dict(),
             "member_loop": (resolve_member_loop(member_loop, mesh) if spec.defense == "awm"
                             else "vmap"),
             "spec": {"grid": dict(spec.grid), "zip": dict(spec.zip), "seeds": list(spec.seeds)},
             "clean_data": clean.to_dict(), "n_clean": len(clean_split),
             "eval_size": len(eval_split), "sweep_seconds": sweep_seconds,
             "seconds": time.perf_counter() - start, **(extra or {}), "rows": rows}
    if out_dir is not None and jax.process_index() == 0:
        write_outputs(out_dir, table, spec.swept_names)
    return table


def _awm_group(model, variables, clean_split, eval_split, triggered, config, group, *,
               checkpoint_every, **kwargs):
    """One seed group of an AWM sweep: ``(seconds, metrics per member, row extras)``."""
    result = run_sweep(model, variables, clean_split, config, group,
                       checkpoint_every=checkpoint_every, **kwargs)
    after = evaluate_members(model, variables, result.masks, eval_split, triggered,
                             member_chunk=result.chunk_size)
    extras = [{"mask_mean": mask_statistics(result.member_mask(index))["mean"],
               "selected_epoch": int(result.selected_epoch[index]),
               "final_loss": float(result.history["loss"][-1, index])}
              for index in range(result.num_members)]
    return result.seconds, after, extras


def _baseline_group(model, variables, clean_split, eval_split, triggered, config, group, *,
                    checkpoint_every, member_loop, **kwargs):
    """One seed group of an FT/ANP sweep: ``(seconds, metrics per member, row extras)``."""
    del checkpoint_every  # no checkpoints: sweep_model refuses a workdir for baselines
    del member_loop  # baseline sweeps are always vmapped
    result = run_baseline_sweep(group.defense, model, variables, clean_split, config, group,
                                **kwargs)
    after = evaluate_members(model, variables, result.outputs, eval_split, triggered,
                             member_chunk=result.chunk_size,
                             purified=get_adapter(group.defense).purified)
    extras = [{"final_loss": float(result.history["loss"][-1, index]),
               "diverged": bool(result.diverged[index]), **result.details(index)}
              for index in range(result.num_members)]
    return result.seconds, after, extras


def write_outputs(out_dir: str | Path, table: dict[str, Any], swept: list[str]) -> list[Path]:
    """``sweep.json``, ``sweep.csv``, and (when something is swept) the heatmaps and Pareto plot."""
    out_dir = Path(out_dir)
    meta = {k: v for k, v in table.items() if k != "rows"}
    paths = list(report_lib.write_table(out_dir, table["rows"], meta))
    axes = swept or ["seed"]
    defense = table.get("defense", "awm").upper()
    paths.append(report_lib.plot_heatmaps(table["rows"], axes, out_dir / report_lib.HEATMAP_PNG,
                                          defense=defense))
    paths.append(report_lib.plot_pareto(table["rows"], out_dir / report_lib.PARETO_PNG,
                                        label_names=swept, defense=defense))
    return paths


def sweep_checkpoint(checkpoint: str | Path, config, spec: SweepSpec, *,
                     dataset_source: str | None = None, **kwargs) -> dict[str, Any]:
    """:func:`sweep_model` on a ``train-backdoor`` checkpoint (dataset and attack from its
    metadata unless ``dataset_source`` overrides the dataset)."""
    model, variables, metadata = load_model(checkpoint)
    dataset = load_dataset(dataset_source or metadata["dataset"]["name"])
    attack = create_attack(metadata["attack"]["name"], **metadata["attack"]["params"])
    return sweep_model(model, variables, dataset, attack, config, spec,
                       extra={"checkpoint": str(checkpoint)}, **kwargs)


def print_table(table: dict[str, Any], swept: list[str]) -> str:
    """A plain-text table of the rows, as the CLI prints it."""
    columns = ["member", "seed", *swept, *METRICS]
    lines = ["  ".join(f"{c:>8}" for c in columns)]
    for row in table["rows"]:
        lines.append("  ".join(f"{row[c]:>8.4g}" if isinstance(row[c], float) else
                               f"{row[c]:>8}" for c in columns))
    return "\n".join(lines)

