"""compare: one clean draw for every defense, failures recorded, outputs and the CLI."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "defenses"))
from baseline_backdoor import tiny_backdoor

from awm_jax.cli import main
from awm_jax.compare import DefenseSpec, compare_defenses, resolve_defenses
from awm_jax.data.clean_subset import CleanDataConfig
from awm_jax.defenses import DEFENSES, Defense
from awm_jax.defenses.ablation import preset
from awm_jax.defenses.finetune import FTConfig
from awm_jax.pipeline import purify_model
from awm_jax.training.loop import save_result

TINY_AWM = {"outer_epochs": 2, "batch_size": 32, "inner_passes": 1, "tau": 50.0}


@pytest.fixture(scope="module")
def backdoor():
    return tiny_backdoor()


@pytest.fixture(scope="module")
def checkpoint(backdoor, tmp_path_factory):
    path = tmp_path_factory.mktemp("bd") / "bd"
    save_result(path, backdoor.trained, backdoor.dataset, backdoor.attack)
    return path


@pytest.fixture
def boom(monkeypatch):
    """A registered defense that always raises (removed again after the test)."""
    def purify(*args, **kwargs):
        raise RuntimeError("boom went the defense")

    monkeypatch.setitem(DEFENSES._entries, "boom", lambda: Defense("boom", FTConfig, purify))
    return "boom"


def test_resolve_checks_names_presets_and_settings():
    specs = resolve_defenses(["ft", "ablation:awm"], {"ft": {"epochs": 2}})
    assert specs[0] == DefenseSpec("ft", "ft", FTConfig(epochs=2))
    assert specs[1].config == preset("awm")
    with pytest.raises(ValueError, match=r"unknown defense 'nope'; known: .*awm.*ft"):
        resolve_defenses(["awm", "nope"])
    with pytest.raises(ValueError, match="known: anp, weight_mask"):
        resolve_defenses(["ablation:nope"])
    with pytest.raises(ValueError, match="no presets"):
        resolve_defenses(["ft:fast"])
    with pytest.raises(ValueError, match="unique"):
        resolve_defenses(["ft", "ft"])
    with pytest.raises(ValueError, match="not compared"):
        resolve_defenses(["ft"], {"anp": {"eps": 0.1}})
    with pytest.raises(ValueError, match="epochs"):
        resolve_defenses(["ft"], {"ft": {"epochs": 0}})


def test_compare_uses_one_clean_draw_and_writes_outputs(backdoor, tmp_path):
    clean = CleanDataConfig(n_clean=100)
    report = compare_defenses(backdoor.model, backdoor.variables, backdoor.dataset,
                              backdoor.attack, ["ft", "awm"],
                              overrides={"ft": {"epochs": 1}, "awm": TINY_AWM}, clean=clean,
                              seed=3, out_dir=tmp_path, progress=False)
    assert [r["label"] for r in report["rows"]] == ["none", "ft", "awm"]
    assert report["failed"] == [] and report["n_clean"] == 100
    for row in report["rows"]:
        assert row["error"] is None
        assert all(0.0 <= row[name] <= 1.0 for name in ("acc", "asr", "asr_all", "ra"))
    assert report["rows"][0]["asr"] > 0.9 and report["rows"][2]["seconds"] > 0
    assert report["rows"][1]["config"] == FTConfig(epochs=1).to_dict()
    # A row equals `purify` of that defense with the same seed: same clean draw and keys.
    single = purify_model(backdoor.model, backdoor.variables, backdoor.dataset, backdoor.attack,
                          model_name="small_cnn", defense="ft",
                          defense_config=FTConfig(epochs=1), clean=clean, seed=3,
                          progress=False)
    assert {k: report["rows"][1][k] for k in single["after"]} == single["after"]
    assert {k: report["rows"][0][k] for k in single["before"]} == single["before"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["label"] for r in saved["rows"]] == ["none", "ft", "awm"]
    assert saved["machine"]["backend"] == "cpu" and saved["machine"]["cpu_count"] >= 1
    # Each defense's own report details travel with its row (as purify's report.json has them).
    assert saved["rows"][1]["details"] == json.loads(json.dumps(single["details"]))
    table = (tmp_path / "compare.md").read_text()
    assert "| defense | ACC | ASR | ASR (all) | RA | seconds | error |" in table
    assert table.count("\n| ") == 4  # the header and the none, ft and awm rows
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_a_failing_defense_is_recorded_and_the_others_kept(backdoor, boom, tmp_path):
    report = compare_defenses(backdoor.model, backdoor.variables, backdoor.dataset,
                              backdoor.attack, [boom, "ft"], overrides={"ft": {"epochs": 1}},
                              clean=CleanDataConfig(n_clean=60), out_dir=tmp_path,
                              progress=False)
    failed, ft = report["rows"][1], report["rows"][2]
    assert report["failed"] == ["boom"]
    assert failed["error"] == "RuntimeError: boom went the defense" and failed["acc"] is None
    assert ft["error"] is None and ft["acc"] > 0.9
    assert "RuntimeError: boom went the defense" in (tmp_path / "compare.md").read_text()


def test_cli_compare_with_per_defense_flags(checkpoint, tmp_path, capsys):
    code = main(["compare", "--checkpoint", str(checkpoint), "--defenses", "ft,awm",
                 "--n-clean", "100", "--ft-epochs", "1", "--ft-learning-rate", "0.02",
                 *[f"--awm-{k.replace('_', '-')}={v}" for k, v in TINY_AWM.items()],
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| ft |" in out and "| awm |" in out and "| none |" in out
    saved = json.loads((tmp_path / "compare.json").read_text())
    configs = {row["label"]: row["config"] for row in saved["rows"]}
    assert configs["ft"] == FTConfig(epochs=1, learning_rate=0.02).to_dict()
    assert configs["awm"]["outer_epochs"] == 2 and configs["awm"]["tau"] == 50.0


def test_cli_compare_exits_nonzero_after_a_failure(checkpoint, boom, tmp_path, capsys):
    code = main(["compare", "--checkpoint", str(checkpoint), "--defenses", f"{boom},ft",
                 "--n-clean", "60", "--ft-epochs", "1", "--out", str(tmp_path), "--quiet"])
    assert code == 1
    assert "boom failed: RuntimeError" in capsys.readouterr().err
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows[2]["label"] == "ft" and rows[2]["acc"] > 0.9


@pytest.mark.parametrize("argv, message", [
    (["--defenses", "awm,nope"], "unknown defense 'nope'; known: "),
    (["--defenses", "ft", "--anp-eps", "0.3"], "--anp-* set, but anp is not run here"),
    (["--defenses", "ablation:nope"], "unknown ablation preset"),
])
def test_cli_compare_rejects_bad_defenses_before_running(tmp_path, capsys, argv, message):
    # The checkpoint does not exist: the names are checked before it is loaded.
    assert main(["compare", "--checkpoint", str(tmp_path / "none"), *argv,
                 "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_purify_takes_the_chosen_defense_flags(checkpoint, tmp_path, capsys):
    assert main(["purify", "--checkpoint", str(checkpoint), "--defense", "ft",
                 "--anp-eps", "0.3", "--out", str(tmp_path / "x")]) == 2
    assert "--anp-* set, but anp is not run here" in capsys.readouterr().err
    assert main(["purify", "--checkpoint", str(checkpoint), "--defense", "ablation",
                 "--ablation-preset", "weight_mask", "--ablation-iterations", "3",
                 "--ablation-batch-size", "32", "--n-clean", "60",
                 "--out", str(tmp_path / "abl"), "--quiet"]) == 0
    config = json.loads((tmp_path / "abl" / "report.json").read_text())["config"]
    assert config == preset("weight_mask", iterations=3, batch_size=32).to_dict()


def test_cli_compare_and_purify_checkpoint_every_defense_in_a_workdir(checkpoint, tmp_path,
                                                                      capsys):
    argv = ["compare", "--checkpoint", str(checkpoint), "--defenses", "ft,ablation:anp",
            "--n-clean", "60", "--ft-epochs", "2", "--ablation-iterations", "2",
            "--ablation-batch-size", "32", "--workdir", str(tmp_path / "work"), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ablation-anp", "ft"]
    assert (tmp_path / "work" / "ft" / "2").is_dir()
    assert main([*argv, "--out", str(tmp_path / "b")]) == 1  # checkpoints there, no --resume
    assert "already holds ft checkpoints" in capsys.readouterr().err
    assert main([*argv, "--resume", "--out", str(tmp_path / "c")]) == 0  # finished: reports
    rows = [json.loads((tmp_path / out / "compare.json").read_text())["rows"] for out in "ac"]
    assert [{k: r[k] for k in ("label", "acc", "asr")} for r in rows[0]] == \
        [{k: r[k] for k in ("label", "acc", "asr")} for r in rows[1]]
    assert main(["purify", "--checkpoint", str(checkpoint), "--defense", "ft", "--n-clean", "60",
                 "--ft-epochs", "2", "--workdir", str(tmp_path / "p"), "--checkpoint-every", "2",
                 "--out", str(tmp_path / "p_out"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["2"]
