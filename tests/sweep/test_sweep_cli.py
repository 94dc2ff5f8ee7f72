"""``awm-jax sweep`` end to end on a tiny backdoored digits model: table, plots, and members
equal to ``awm-jax purify`` with the same seed and settings."""

import csv
import json

import pytest

from awm_jax.attacks.base import create_attack
from awm_jax.cli import main
from awm_jax.data.sources import load_dataset
from awm_jax.sweep.report import pareto_front, seed_means
from awm_jax.training.config import TrainConfig
from awm_jax.training.loop import train_backdoored_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("backdoored")
    train_backdoored_model(
        load_dataset("digits"), create_attack("badnets", target=0, patch_size=3),
        TrainConfig(model="small_cnn", model_kwargs={"features": (8, 16)}, epochs=3,
                    batch_size=64, learning_rate=0.02), workdir=workdir, progress=False)
    return workdir


AWM_FLAGS = ["--one-shot", "--no-flip", "--awm-outer-epochs", "1", "--awm-batch-size", "32",
             "--awm-inner-passes", "1"]


@pytest.fixture(scope="module")
def swept(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    code = main(["sweep", "--checkpoint", str(checkpoint), "--grid", "alpha=0.8,0.9",
                 "--grid", "tau=50,100", "--seeds", "0", "1", *AWM_FLAGS, "--out", str(out),
                 "--quiet"])
    assert code == 0
    return out


def test_sweep_cli_writes_table_and_plots(swept):
    rows = json.loads((swept / "sweep.json").read_text())["rows"]
    assert len(rows) == 8 and [r["seed"] for r in rows] == [0] * 4 + [1] * 4
    assert {(r["alpha"], r["tau"]) for r in rows} == {(a, t) for a in (0.8, 0.9)
                                                       for t in (50.0, 100.0)}
    for row in rows:
        assert all(0.0 <= row[m] <= 1.0 for m in ("acc", "asr", "asr_all", "ra"))
    with open(swept / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 8
    assert (swept / "heatmap.png").stat().st_size > 0
    assert (swept / "pareto.png").stat().st_size > 0


@pytest.mark.slow
def test_sweep_member_equals_purify_with_its_seed(checkpoint, swept, tmp_path):
    """Member (alpha=0.9, tau=100, seed 1) equals ``awm-jax purify`` with those settings."""
    rows = json.loads((swept / "sweep.json").read_text())["rows"]
    assert main(["purify", "--checkpoint", str(checkpoint), "--seed", "1", *AWM_FLAGS,
                 "--awm-alpha", "0.9", "--awm-tau", "100", "--out", str(tmp_path),
                 "--quiet"]) == 0
    single = json.loads((tmp_path / "report.json").read_text())["after"]
    member = next(r for r in rows if (r["alpha"], r["tau"], r["seed"]) == (0.9, 100.0, 1))
    for name in ("acc", "asr", "asr_all", "ra"):
        assert member[name] == pytest.approx(single[name], abs=2e-3)


def test_sweep_cli_checkpoints_and_resumes(checkpoint, swept, tmp_path):
    work = tmp_path / "work"
    args = ["sweep", "--checkpoint", str(checkpoint), "--grid", "alpha=0.8,0.9", "--grid",
            "tau=50,100", "--seeds", "0", "1", *AWM_FLAGS, "--quiet", "--workdir", str(work)]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["seed_0", "seed_1"]
    assert main([*args, "--out", str(tmp_path / "again")]) == 2  # would overwrite: refused
    assert main([*args, "--resume", "--out", str(tmp_path / "again")]) == 0  # reloads
    rows = [json.loads((d / "sweep.json").read_text())["rows"]
            for d in (swept, tmp_path / "first", tmp_path / "again")]
    assert rows[0] == rows[1] == rows[2]


def test_sweep_cli_rejects_static_fields(checkpoint, tmp_path, capsys):
    code = main(["sweep", "--checkpoint", str(checkpoint), "--grid", "outer_epochs=1,2",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 2 and "sweepable names" in capsys.readouterr().err


def test_pareto_front_and_seed_means_by_hand():
    assert pareto_front([0.9, 0.8, 0.95, 0.7], [0.5, 0.1, 0.6, 0.2]) == [1, 0, 2]
    rows = [{"a": 1, "b": 2, "seed": s, "asr": v} for s, v in ((0, 0.2), (1, 0.4))]
    values, table = seed_means(rows + [{"a": 2, "b": 2, "seed": 0, "asr": 1.0}], ["a", "b"], "asr")
    assert values == [[1, 2], [2]] and table[0, 0] == pytest.approx(0.3) and table[1, 0] == 1.0
