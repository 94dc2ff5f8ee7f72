"""``awm-jax``: train backdoored models, purify them, evaluate them, or run the offline demo.

The CLI only parses arguments and calls library functions (:mod:`awm_jax.pipeline`,
:mod:`awm_jax.training`, :mod:`awm_jax.demo`). Every config field is a flag, documented from the
config's docstring; unset flags keep the documented defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from awm_jax.config_flags import (
    add_config_flags,
    add_defense_flags,
    config_from_flags,
    defense_flags_set,
    defense_prefix,
)

EPILOG = """examples:
  awm-jax demo                                   # offline: backdoor + AWM on digits, ~1 min
  awm-jax train-backdoor --dataset digits --attack badnets --attack-param target=0 \\
      --attack-param patch_size=3 --epochs 30 --out runs/digits_badnets
  awm-jax purify --checkpoint runs/digits_badnets --one-shot --awm-tau 50 --out runs/awm
  awm-jax evaluate --checkpoint runs/awm/purified
  awm-jax export --checkpoint runs/awm/purified --format safetensors --out awm.safetensors
  awm-jax sweep --checkpoint runs/digits_badnets --grid alpha=0.8,0.9 --grid tau=50,100 \\
      --seeds 0 1 --one-shot --out runs/sweep          # vmapped: table, heatmaps, Pareto
  awm-jax sweep --checkpoint runs/digits_badnets --defense ft \\
      --grid learning_rate=0.001,0.01 --seeds 0 1 --ft-epochs 5 --out runs/sweep_ft
  awm-jax compare --checkpoint runs/digits_badnets --defenses awm,ft,fp,nad,anp \\
      --one-shot --awm-tau 50 --ft-epochs 5 --out runs/compare   # same clean images for all
  awm-jax compare --checkpoint runs/digits_badnets --out runs/table4 \\
      --defenses ablation:anp,ablation:weight_mask,ablation:weight_mask_trigger,ablation:awm

Every defense's settings are flags named --DEFENSE-FIELD, generated from its config class
(e.g. --awm-tau, --ft-epochs, --anp-eps, --ablation-mask; --awm-preset, --nad-preset,
--ablation-preset, ... pick a named preset); `purify` and `compare` accept the flags of the
defenses they run.
"""


def _key_values(pairs: list[str] | None, flag: str) -> dict:
    """Parses ``k=v`` pairs; values are JSON when they parse as JSON, else strings."""
    values = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"{flag} expects key=value; got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def _parser() -> argparse.ArgumentParser:
    from awm_jax.training.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="awm-jax", description="Erase neural backdoors with Adversarial Weight Masking.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="offline end-to-end demo on scikit-learn digits")
    demo.add_argument("--seed", type=int, default=0, help="root seed [default: 0]")
    demo.add_argument("--out", default="awm_demo", help="output directory [default: awm_demo]")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    train = commands.add_parser("train-backdoor", help="poison a dataset and train a model")
    train.add_argument("--dataset", default="digits",
                       help="dataset source: digits, a TFDS name, an ImageFolder dir/archive, "
                            "or an .npz/.h5 file [default: digits]")
    train.add_argument("--download", action="store_true",
                       help="download and prepare a TFDS dataset that is not on disk yet")
    train.add_argument("--attack", default="badnets",
                       help="attack name, or none for a clean model [default: badnets]")
    train.add_argument("--clean-checkpoint", default=None,
                       help="a clean model directory (from --attack none); CLB perturbs its "
                            "poison against it")
    train.add_argument("--cross-ratio", type=float, default=2.0,
                       help="WaNet noise-mode images per poisoned image (0: off) [default: 2]")
    train.add_argument("--attack-param", action="append", metavar="K=V",
                       help="attack parameter, repeatable (e.g. target=0)")
    train.add_argument("--model-param", action="append", metavar="K=V",
                       help="model keyword argument, repeatable (e.g. width=16)")
    train.add_argument("--out", required=True, help="checkpoint directory to create")
    train.add_argument("--eval-every", type=int, default=0,
                       help="evaluate ACC/ASR every N epochs (0: at the end) [default: 0]")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--checkpoint-every", type=int, default=1,
                       help="epochs between checkpoints in OUT/checkpoints [default: 1]")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in OUT/checkpoints (fresh start "
                            "if there is none; the config must be unchanged)")
    train.add_argument("--keep-checkpoints", action="store_true",
                       help="keep OUT/checkpoints after the final model is saved")
    add_config_flags(train, TrainConfig, "", skip=("model_kwargs",))

    purify = commands.add_parser("purify", help="purify a backdoored checkpoint")
    purify.add_argument("--checkpoint", required=True, help="directory from train-backdoor")
    purify.add_argument("--defense", default="awm", help="defense name [default: awm]")
    purify.add_argument("--dataset", default=None,
                        help="dataset source (default: the one in the checkpoint's metadata)")
    _add_clean_flags(purify)
    purify.add_argument("--seed", type=int, default=0, help="root seed [default: 0]")
    purify.add_argument("--track-epochs", action="store_true",
                        help="evaluate after every epoch and plot ACC/ASR over epochs")
    purify.add_argument("--out", required=True, help="directory for report.json and the model")
    purify.add_argument("--quiet", action="store_true", help="no progress bars")
    purify.add_argument("--workdir", default=None,
                        help="checkpoint the defense's whole state here (orbax; every "
                             "defense) so that a killed run can --resume")
    purify.add_argument("--checkpoint-every", type=int, default=1,
                        help="defense steps between checkpoints in --workdir (epochs; FP: "
                             "pruning + epochs; NAD: teacher + student epochs; NC: passes + "
                             "unlearning epochs; ANP: blocks of N/batch iterations; I-BAU: "
                             "rounds) [default: 1]")
    purify.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --workdir (fresh start "
                             "if there is none; the config must be unchanged)")
    add_defense_flags(purify)

    evaluate = commands.add_parser("evaluate", help="ACC, ASR and RA of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="model directory")
    evaluate.add_argument("--dataset", default=None, help="dataset source override")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of random triggers")
    evaluate.add_argument("--out", default=None, help="optional JSON file for the metrics")

    export = commands.add_parser("export", help="write a model directory as npz or safetensors")
    export.add_argument("--checkpoint", required=True,
                        help="model directory (e.g. purify's OUT/purified)")
    export.add_argument("--format", required=True, choices=("npz", "safetensors", "checkpoint"),
                        help="npz or safetensors file of named arrays (params/Conv_0/kernel), "
                             "or a copy as a model directory")
    export.add_argument("--out", required=True, help="file (or directory) to write")
    _add_sweep_parser(commands)
    _add_compare_parser(commands)
    _add_import_torch_parser(commands)
    return parser


def _add_clean_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("defender's clean data (drawn from the test split)")
    group.add_argument("--n-clean", type=int, default=500, help="images drawn [default: 500]")
    group.add_argument("--per-class", type=int, default=None,
                       help="draw this many images of every class instead of --n-clean")
    group.add_argument("--one-shot", action="store_true",
                       help="one image per class plus 9 random-resized-crop views of each "
                            "(AWM settings for it: --awm-preset official_one_shot, or "
                            "cifar10_one_shot on CIFAR-10)")
    group.add_argument("--augment-views", type=int, default=None,
                       help="views per image (one-shot: 9, else 0)")
    group.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0),
                       metavar=("LOW", "HIGH"), help="crop area range [default: 0.08 1.0]")
    group.add_argument("--no-flip", action="store_true", help="no horizontal flips of views")


def _clean_config(args):
    from awm_jax.data.clean_subset import clean_data_config

    return clean_data_config(n_clean=args.n_clean, per_class=args.per_class,
                             one_shot=args.one_shot, augment_views=args.augment_views,
                             crop_scale=args.crop_scale, flip=not args.no_flip)


def _demo(args) -> dict:
    from awm_jax.demo import run_demo

    report = run_demo(seed=args.seed, out_dir=args.out, progress=not args.quiet)
    print(f"backdoored model trained in {report['training']['seconds']:.1f} s")
    return report


def _train(args) -> dict:
    from awm_jax.attacks.base import create_attack
    from awm_jax.data.sources import load_dataset
    from awm_jax.training.config import TrainConfig
    from awm_jax.training.loop import train_backdoored_model

    dataset = load_dataset(args.dataset, **({"download": True} if args.download else {}))
    attack = None if args.attack == "none" else create_attack(
        args.attack, num_classes=dataset.num_classes,
        **_key_values(args.attack_param, "--attack-param"))
    config = config_from_flags(args, TrainConfig, "", base=TrainConfig(
        model_kwargs=_key_values(args.model_param, "--model-param")))
    clean_logits_fn = None
    if args.clean_checkpoint:
        from awm_jax.checkpoint import load_model
        from awm_jax.models.base import apply_model

        clean_model, clean_variables, _ = load_model(args.clean_checkpoint)

        def clean_logits_fn(images):
            return apply_model(clean_model, clean_variables["params"],
                               clean_variables["batch_stats"], images)[0]

    result = train_backdoored_model(
        dataset, attack, config, workdir=args.out, progress=not args.quiet,
        eval_every=args.eval_every, checkpoint_dir=os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        keep_checkpoints=args.keep_checkpoints, clean_logits_fn=clean_logits_fn,
        cross_ratio=args.cross_ratio)
    print(json.dumps({"checkpoint": args.out, "seconds": round(result.seconds, 1),
                      **result.metrics}, indent=2))
    return {}


def _defense_settings(args, names: list[str]) -> dict[str, dict]:
    """Field changes per defense from the --DEFENSE-* flags; flags of a defense that is not in
    ``names`` are an error rather than silently ignored."""
    changes = defense_flags_set(args)
    unused = sorted(set(changes) - set(names))
    if unused:
        flags = ", ".join(f"--{name}-*" for name in unused)
        raise ValueError(f"{flags} set, but {', '.join(unused)} is not run here "
                         f"(running: {', '.join(names)}).")
    return changes


def _purify(args) -> dict:
    from awm_jax.defenses import get_defense
    from awm_jax.pipeline import purify_checkpoint

    cls = get_defense(args.defense).config_class
    _defense_settings(args, [args.defense])
    defense_config = config_from_flags(args, cls, defense_prefix(args.defense))
    return purify_checkpoint(args.checkpoint, dataset_source=args.dataset, defense=args.defense,
                             defense_config=defense_config, clean=_clean_config(args),
                             seed=args.seed, out_dir=args.out, track_epochs=args.track_epochs,
                             progress=not args.quiet, workdir=args.workdir,
                             checkpoint_every=args.checkpoint_every, resume=args.resume)


def _evaluate(args) -> dict:
    import jax

    from awm_jax.attacks.base import create_attack, triggered_test_set
    from awm_jax.checkpoint import load_model
    from awm_jax.data.sources import load_dataset
    from awm_jax.eval.metrics import evaluate_backdoor, make_predict_fn
    from awm_jax.models import check_images_fit

    model, variables, metadata = load_model(args.checkpoint)
    dataset = load_dataset(args.dataset or metadata["dataset"]["name"])
    check_images_fit(model, variables, dataset.image_shape, f"{dataset.name} images")
    attack = create_attack(metadata["attack"]["name"], **metadata["attack"]["params"])
    triggered = triggered_test_set(dataset.test, attack, jax.random.key(args.seed))
    metrics = evaluate_backdoor(functools.partial(make_predict_fn(model), variables),
                                dataset.test, triggered)
    print(json.dumps(metrics, indent=2))
    if args.out:
        from awm_jax.serialization import write_json_atomic

        write_json_atomic(args.out, {"checkpoint": args.checkpoint, "dataset": dataset.name,
                              "attack": attack.name, **metrics})
    return {}


def _export(args) -> dict:
    from awm_jax.export import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.format, args.out)}")
    return {}


def _add_import_torch_parser(commands) -> None:
    parser = commands.add_parser("import-torch",
                                 help="convert a PyTorch state_dict into a model directory")
    parser.add_argument("--state-dict", required=True,
                        help=".pth/.pt file (needs PyTorch) or .npz of the state_dict's arrays")
    parser.add_argument("--model", required=True,
                        help="resnet18 (kuangliu, official AWM), preact_resnet18 (BackdoorBench) "
                             "or small_vgg")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="[default: the rows of the head's weight]")
    parser.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("H", "W", "C"),
                        help="input shape [default: 32 32 and the stem's input channels]")
    parser.add_argument("--model-param", action="append", metavar="K=V",
                        help="model keyword argument, repeatable (e.g. mean=[0.5,0.5,0.5])")
    parser.add_argument("--out", required=True, help="model directory to create")


def _import_torch(args) -> dict:
    from awm_jax.interop.torch_import import save_imported

    directory = save_imported(args.state_dict, args.model, args.out,
                              num_classes=args.num_classes, image_shape=args.image_shape,
                              **_key_values(args.model_param, "--model-param"))
    print(f"wrote {directory}")
    return {}


def _add_sweep_parser(commands) -> None:
    from awm_jax.sweep.spec import HPARAMS

    sweep = commands.add_parser(
        "sweep", help="vmapped hyperparameter sweep of a checkpoint (AWM, FT or ANP)",
        description="Runs every member of a hyperparameter grid of one defense as one vmapped "
                    "program. Sweepable names: " + "; ".join(
                        f"{name}: {', '.join(h._fields)}" for name, (_, h) in HPARAMS.items())
                    + ". The defense's other settings are its --DEFENSE-FIELD flags.")
    sweep.add_argument("--checkpoint", required=True, help="directory from train-backdoor")
    sweep.add_argument("--defense", default="awm", choices=list(HPARAMS),
                       help="the swept defense [default: awm]")
    sweep.add_argument("--dataset", default=None, help="dataset source override")
    sweep.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                       help="swept hparam of the defense and its values (Cartesian product), "
                            "repeatable")
    sweep.add_argument("--zip", action="append", metavar="NAME=V1,V2",
                       help="hparam values zipped with the other --zip lists, repeatable")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds [default: 0]")
    sweep.add_argument("--chunk-size", type=int, default=None,
                       help="members per compiled chunk [default: from a memory estimate]")
    sweep.add_argument("--member-loop", choices=("auto", "vmap", "loop"), default="auto",
                       help="AWM: vmap a chunk's members, or run each member's step in turn "
                            "(faster on a CPU) [default: auto = loop on one CPU device]")
    sweep.add_argument("--devices", type=int, default=None,
                       help="shard members over this many devices [default: no mesh]")
    _add_clean_flags(sweep)
    sweep.add_argument("--out", required=True, help="directory for sweep.json/.csv and plots")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.add_argument("--workdir", default=None,
                       help="checkpoint the whole sweep state here (orbax; WORKDIR/seed_S per "
                            "seed) so that a killed sweep can --resume (AWM sweeps only)")
    sweep.add_argument("--checkpoint-every", type=int, default=1,
                       help="epochs (counted over all chunks) between checkpoints [default: 1]")
    sweep.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoints in --workdir (fresh start if "
                            "there are none; the config, chunk size and devices must be "
                            "unchanged)")
    hosts = sweep.add_argument_group(
        "many hosts (jax.distributed, AWM sweeps only; see awm_jax.sweep.distributed for TPU "
        "pod and SLURM commands)")
    hosts.add_argument("--distributed", action="store_true",
                       help="initialise jax.distributed, detecting the cluster (TPU pod slice, "
                            "SLURM, Open MPI) where the flags below are not given")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's coordinator address [env: JAX_COORDINATOR_ADDRESS]")
    hosts.add_argument("--num-processes", type=int, default=None,
                       help="processes in the run [env: JAX_NUM_PROCESSES]")
    hosts.add_argument("--process-id", type=int, default=None,
                       help="this process's index [env: JAX_PROCESS_ID]")
    add_defense_flags(sweep, list(HPARAMS))


def _value_lists(pairs: list[str] | None, flag: str) -> dict[str, list[float]]:
    values = {}
    for pair in pairs or []:
        name, _, raw = pair.partition("=")
        try:
            values[name.strip()] = [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"{flag} expects NAME=V1,V2,... with numbers; got {pair!r}")
    return values


def _sweep(args) -> dict:
    from awm_jax.sweep import distributed

    # Before anything touches JAX's devices: a multi-process run needs jax.distributed first.
    spans_processes = distributed.initialize(args.coordinator, args.num_processes,
                                             args.process_id, auto=args.distributed)

    from awm_jax.sweep import SweepSpec, make_sweep_mesh
    from awm_jax.sweep.job import print_table, sweep_checkpoint
    from awm_jax.sweep.spec import config_class

    _defense_settings(args, [args.defense])
    if args.defense != "awm" and (args.workdir or args.resume):
        raise ValueError(f"--workdir/--resume (checkpointing) is supported for AWM sweeps "
                         f"only; run the {args.defense} sweep without them.")
    config = config_from_flags(args, config_class(args.defense), defense_prefix(args.defense))
    spec = SweepSpec(grid=_value_lists(args.grid, "--grid"), zip=_value_lists(args.zip, "--zip"),
                     seeds=args.seeds, defense=args.defense)
    # Across processes the mesh must hold every process's devices.
    mesh = (make_sweep_mesh(sweep=args.devices) if args.devices else
            make_sweep_mesh() if spans_processes else None)
    table = sweep_checkpoint(args.checkpoint, config, spec,
                             dataset_source=args.dataset, clean=_clean_config(args),
                             chunk_size=args.chunk_size, mesh=mesh, out_dir=args.out,
                             progress=not args.quiet, workdir=args.workdir,
                             checkpoint_every=args.checkpoint_every, resume=args.resume,
                             member_loop=args.member_loop)
    if distributed.is_main_process():
        print(print_table(table, spec.swept_names))
        print(f"{len(table['rows'])} members in {table['sweep_seconds']:.1f} s; wrote {args.out}")
    return {}


def _add_compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="run several defenses on the same clean images; table and plot",
        description="Runs every defense in --defenses on ONE draw of clean images and one "
                    "evaluation set, and writes compare.json, compare.md and an ASR-vs-ACC "
                    "plot compare.png. A defense that fails is reported in the table and the "
                    "others still run; the exit status is then 1. Each defense's settings are "
                    "its --DEFENSE-FIELD flags.")
    compare.add_argument("--checkpoint", required=True, help="directory from train-backdoor")
    compare.add_argument("--defenses", required=True, metavar="NAME[,NAME:PRESET...]",
                         help="comma-separated registered defenses; NAME:PRESET uses a named "
                              "preset of the defense's config (e.g. ablation:awm)")
    compare.add_argument("--dataset", default=None, help="dataset source override")
    _add_clean_flags(compare)
    compare.add_argument("--seed", type=int, default=0, help="root seed [default: 0]")
    compare.add_argument("--out", required=True, help="directory for compare.json/.md/.png")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("--workdir", default=None,
                         help="checkpoint every defense's run in WORKDIR/<label> (orbax)")
    compare.add_argument("--checkpoint-every", type=int, default=1,
                         help="defense steps between checkpoints in --workdir [default: 1]")
    compare.add_argument("--resume", action="store_true",
                         help="continue every defense from its newest checkpoint in "
                              "--workdir (finished ones only report)")
    add_defense_flags(compare)


def _compare(args) -> int:
    from awm_jax.compare import compare_checkpoint, describe

    entries = [e.strip() for e in args.defenses.split(",") if e.strip()]
    changes = _defense_settings(args, [e.partition(":")[0] for e in entries])
    presets = {name: c.pop("preset") for name, c in changes.items() if "preset" in c}
    entries = [f"{e}:{presets[e]}" if e in presets else e for e in entries]
    report = compare_checkpoint(args.checkpoint, entries, dataset_source=args.dataset,
                                overrides=changes, clean=_clean_config(args), seed=args.seed,
                                out_dir=args.out, progress=not args.quiet,
                                workdir=args.workdir, checkpoint_every=args.checkpoint_every,
                                resume=args.resume)
    print(describe(report))
    print(f"wrote {Path(args.out) / 'compare.json'}, compare.md and compare.png")
    for row in report["rows"]:
        if row["error"]:
            print(f"awm-jax compare: {row['label']} failed: {row['error']}", file=sys.stderr)
    return 1 if report["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"demo": _demo, "train-backdoor": _train, "purify": _purify,
               "evaluate": _evaluate, "export": _export, "sweep": _sweep, "compare": _compare,
               "import-torch": _import_torch}[args.command]
    try:
        report = handler(args)
    except (ValueError, FloatingPointError, FileNotFoundError, ImportError) as error:
        print(f"awm-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    if isinstance(report, int):  # compare returns its exit status
        return report
    if report:
        from awm_jax.pipeline import print_summary

        print(print_summary(report))
        out = Path(args.out)
        print(f"wrote {out / 'report.json'}" + (f" and {out / 'history.png'}"
                                                 if (out / "history.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
