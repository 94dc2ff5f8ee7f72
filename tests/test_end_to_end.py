"""End to end on a small real backdoor: digits + BadNets -> AWM lowers ASR; the CLI round trip."""

import dataclasses
import json

import pytest

from awm_jax.cli import main
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.demo import DemoConfig, run_demo
from awm_jax.eval.report import REPORT_KEYS


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    # The demo exactly as `awm-jax demo` runs it (about 25 s on 2 cores).
    out = tmp_path_factory.mktemp("demo")
    return run_demo(seed=0, out_dir=out, progress=False), out


def test_awm_erases_a_real_backdoor(demo_report):
    report, _ = demo_report
    assert report["before"]["acc"] > 0.9 and report["before"]["asr"] > 0.9
    assert report["after"]["asr"] < 0.15
    assert report["before"]["acc"] - report["after"]["acc"] < 0.1
    assert report["n_clean"] == 100  # ten originals + nine views each


def test_demo_writes_report_plot_and_models(demo_report):
    report, out = demo_report
    saved = json.loads((out / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(saved)
    for phase in ("before", "after"):
        assert set(saved[phase]) == {"acc", "asr", "asr_all", "ra"}
        assert all(0.0 <= v <= 1.0 for v in saved[phase].values())
    assert (out / "history.png").stat().st_size > 1000
    assert (out / "backdoored" / "metadata.json").exists()
    assert (out / "purified" / "metadata.json").exists()
    assert len(saved["history"]) == DemoConfig().awm.outer_epochs
    assert "asr" in saved["history"][0]


def test_cli_purify_and_evaluate_a_checkpoint(demo_report, tmp_path, capsys):
    _, out = demo_report
    code = main(["purify", "--checkpoint", str(out / "backdoored"), "--per-class", "2",
                 "--awm-outer-epochs", "2", "--awm-batch-size", "16", "--awm-tau", "50",
                 "--out", str(tmp_path / "awm"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "awm" / "report.json").read_text())
    assert report["n_clean"] == 20 and report["config"]["outer_epochs"] == 2
    assert report["config"] == dataclasses.asdict(
        AWMConfig(outer_epochs=2, batch_size=16, tau=50.0))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "awm" / "purified"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= evaluated["asr"] <= 1.0
    assert "AWM on digits" in capsys.readouterr().out


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["purify", "--checkpoint", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["purify", "--checkpoint", "x", "--out", "y", "--awm-clip-outer", "maybe"])
