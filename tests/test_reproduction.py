"""The reproduction driver (experiments/reproduction.py): cells, resume, aggregation, Figure D.

The end-to-end tests train the zoo's smoke model (1 epoch on digits32) once into a temporary
models directory and run the smoke size with one-epoch defenses.
"""

import json
import math
import shutil
import sys

import numpy as np
import pytest

from awm_jax.machine import summarize_machine
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "experiments"))
import reproduction
import reproduction_cells
import reproduction_report as report


def _run(capsys, *argv) -> str:
    assert reproduction.main(list(argv)) == 0
    return capsys.readouterr().out


def test_dry_run_lists_every_cell_in_order(tmp_path, capsys):
    out = _run(capsys, "table-a", "--dry-run", "--attacks", "badnets", "blend", "--budgets",
               "n500", "one_shot", "--seeds", "0", "1", "--models-dir", str(tmp_path / "zoo"),
               "--out", str(tmp_path / "out"))
    cells = [line.split("] ")[1] for line in out.splitlines() if line.startswith("[")]
    assert cells == [f"cifar10_{a}_{b}_seed{s}: missing" for a in ("badnets", "blend")
                     for b in ("n500", "one_shot") for s in (0, 1)]
    assert out.count("missing, will be trained") == 2
    assert "8 cells x 7 defenses (ft, fp, nad, nc, anp, ibau, awm)" in out
    # The whole cpu-size tables: 10 attacks x 3 budgets x 3 seeds; Table C's four presets.
    out = _run(capsys, "table-b", "--dry-run", "--out", str(tmp_path / "out"))
    assert "90 cells x 7 defenses" in out and "gtsrb_all_to_all_one_shot_seed2" in out
    out = _run(capsys, "table-c", "--dry-run", "--out", str(tmp_path / "out"))
    assert "9 cells x 4 defenses (ablation:anp, ablation:weight_mask, " in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["table-a", "--attacks", "badnet"], "unknown attacks ['badnet']; known: ['badnets'"),
    (["table-a", "--defenses", "awm", "fine_tune"], "unknown defense 'fine_tune'; known:"),
    (["table-a", "--budgets", "n50"], "unknown budgets ['n50']; known: ['n500', 'n100', "),
    (["table-x"], "invalid choice: 'table-x' (choose from 'table-a', 'table-b'"),
    (["figure-d", "--hparams", "beta"], "unknown hparams ['beta']; known: ['alpha', 'gamma'"),
    (["table-a", "--override", "nc.epochs=2", "--defenses", "awm"], "does not run"),
])
def test_unknown_names_are_argparse_errors_listing_the_known_ones(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduction.main([*argv, "--dry-run"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _cell(attack, budget, seed, acc, asr, error=None):
    rows = [{"label": "none", "defense": "none", "acc": 0.9, "asr": 1.0, "asr_all": 1.0,
             "ra": 0.0, "seconds": 0.0, "error": None},
            {"label": "awm", "defense": "awm", "acc": None if error else acc,
             "asr": None if error else asr, "asr_all": None if error else asr,
             "ra": None if error else 0.5, "seconds": 2.0 + seed, "error": error}]
    return {"dataset": "d", "attack": attack, "budget": budget, "seed": seed, "rows": rows,
            "wall_seconds": 10.0}


def test_aggregation_over_seeds_matches_numpy_and_keeps_errors():
    acc, asr = [0.80, 0.84, 0.83], [0.10, 0.02, 0.06]
    cells = [_cell("badnets", "n500", s, acc[s], asr[s]) for s in range(3)]
    cells.append(_cell("badnets", "n500", 3, None, None, error="FloatingPointError: NaN"))
    cells.append(_cell("blend", "n500", 0, 0.7, 0.3))
    rows = report.raw_rows(cells, ["none", "awm", "ft"])
    assert [r["error"] for r in rows if r["label"] == "ft"] == ["missing from the cell"] * 5
    aggregates = report.aggregate(rows, ["n500"], ["badnets", "blend"], ["none", "awm"])
    assert [(a["attack"], a["label"]) for a in aggregates] == [
        ("badnets", "none"), ("badnets", "awm"), ("blend", "none"), ("blend", "awm")]
    awm = aggregates[1]
    for metric, values in (("acc", acc), ("asr", asr)):
        assert awm[metric]["n"] == 3 and awm["seeds"] == [0, 1, 2]
        assert math.isclose(awm[metric]["mean"], np.mean(values))
        assert math.isclose(awm[metric]["std"], np.std(values, ddof=1))
        assert (awm[metric]["min"], awm[metric]["max"]) == (min(values), max(values))
    assert awm["errors"] == ["seed 3: FloatingPointError: NaN"]
    assert aggregates[0]["acc"]["std"] == 0.0 and aggregates[0]["acc"]["n"] == 4
    assert aggregates[3]["acc"]["std"] is None  # one seed: no spread
    markdown = report.table_markdown("T", aggregates, {"n500": "500 images", "n100": "100"})
    assert (f"| badnets | awm | {100 * np.mean(acc):.2f} ± {100 * np.std(acc, ddof=1):.2f} |"
            in markdown)
    assert "| blend | awm | 70.00 | 30.00 | 30.00 | 50.00 | 1 | 2.0 |" in markdown
    assert "seed 3: FloatingPointError: NaN" in markdown and "(no finished cells)" in markdown


def test_cells_rerun_only_what_changed():
    wanted = {"ft": {"epochs": 1}, "awm": {"tau": 10.0}}
    cell = {"clean_data": {"n_clean": 50}, "model_sha256": "m",
            "rows": [{"label": "none", "error": None},
                     {"label": "ft", "config": {"epochs": 1}, "error": None},
                     {"label": "awm", "config": {"tau": 100.0}, "error": None}]}
    assert reproduction_cells.to_run(None, wanted, {"n_clean": 50}, "m", False) == (
        ["ft", "awm"], False)
    assert reproduction_cells.to_run(cell, wanted, {"n_clean": 50}, "m", False) == (
        ["awm"], False)
    assert reproduction_cells.to_run(cell, wanted, {"n_clean": 100}, "m", False) == (
        ["ft", "awm"], True)
    assert reproduction_cells.to_run(cell, wanted, {"n_clean": 50}, "new", False)[1]
    # Speed-only fields (and their absence from older rows) do not make a row stale.
    cell["rows"][2]["config"] = {"tau": 10.0, "mask_chunks": 1}
    assert reproduction_cells.to_run(cell, {"awm": {"tau": 10.0, "mask_chunks": "auto",
                                                    "loop": "scan"}},
                                     {"n_clean": 50}, "m", False) == ([], False)
    cell["rows"][1]["error"] = "ValueError: x"
    assert reproduction_cells.to_run(cell, {"ft": {"epochs": 1}}, {"n_clean": 50}, "m",
                                     True) == (["ft"], False)


def test_one_shot_budget_runs_awm_with_its_one_shot_preset():
    sel = reproduction.selection(["table-a", "--budgets", "n500", "one_shot",
                                  "--override", "awm.alpha=0.99"])
    n500, one_shot = sel.budgets
    assert reproduction_cells.budget_overrides(sel.overrides, n500, sel.defenses) == {
        "awm": {"alpha": 0.99}, "nc": {"epochs": 50}}
    assert reproduction_cells.budget_overrides(sel.overrides, one_shot, sel.defenses) == {
        "awm": {"batch_size": 32, "tau": 100.0, "alpha": 0.99, "mask_lr": 1e-3},
        "nc": {"epochs": 50}}
    # The command line wins over the budget; a budget's defense that does not run is dropped.
    sel = reproduction.selection(["table-a", "--defenses", "ft", "--budgets", "one_shot"])
    assert reproduction_cells.budget_overrides(sel.overrides, one_shot, sel.defenses) == {}
    sel = reproduction.selection(["table-a", "--budgets", "one_shot", "--override",
                                  "awm.tau=50"])
    assert reproduction_cells.budget_overrides(sel.overrides, one_shot, sel.defenses)["awm"] == {
        "batch_size": 32, "tau": 50.0, "alpha": 0.99, "mask_lr": 1e-3}


def test_figure_plot_handles_zero_on_a_log_axis(tmp_path):
    table = {"rows": [{"member": i, "seed": s, "gamma": g, "acc": 0.8, "asr": 0.1 * s,
                       "asr_all": 0.1, "ra": 0.5, **{f"before_{m}": 0.9 for m in report.METRICS}}
                      for i, (g, s) in enumerate([(0.0, 0), (1e-8, 0), (0.0, 1), (1e-8, 1)])]}
    points = report.aggregate_sweep(table, "gamma")
    assert [p["value"] for p in points] == [0.0, 1e-8]
    assert points[0]["asr"]["mean"] == pytest.approx(0.05) and points[0]["acc"]["n"] == 2
    path = report.plot_figure({"gamma": points}, {"gamma": 1e-8}, ("gamma",),
                              tmp_path / "f.png", "F")
    assert path.stat().st_size > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Table A at smoke size: trains the digits BadNets model, runs FT and AWM on one cell."""
    root = tmp_path_factory.mktemp("reproduction")
    paths = ["--models-dir", str(root / "zoo"), "--workdir", str(root / "work"),
             "--out", str(root / "out")]
    argv = ["table-a", "--size", "smoke", "--attacks", "badnets", "--defenses", "ft", "awm",
            "--budgets", "n50", "--seeds", "0", "--quiet", *paths]
    assert reproduction.main(argv) == 0
    return root, argv, paths


def test_smoke_table_a_trains_the_model_writes_the_table_and_resumes(smoke_run, capsys):
    root, argv, _ = smoke_run
    assert (root / "zoo" / "digits" / "badnets" / "metadata.json").is_file()
    cell_path = root / "out" / "table_a" / "cells" / "digits_badnets_n50_seed0.json"
    cell = json.loads(cell_path.read_text())
    assert [r["label"] for r in cell["rows"]] == ["none", "ft", "awm"]
    assert cell["n_clean"] == 50 and cell["clean_data"]["n_clean"] == 50
    assert not any(r["error"] for r in cell["rows"])
    assert cell["rows"][1]["config"]["epochs"] == 1  # the smoke override reached FT
    assert cell["machine"]["backend"] == "cpu"
    assert {r["machine"] for r in cell["rows"]} == {summarize_machine(cell["machine"])}
    table = json.loads((root / "out" / "table_a" / "table.json").read_text())
    assert table["command"].startswith("python experiments/reproduction.py table-a --size smoke")
    assert "jax" in table["versions"] and table["cells"] == {"expected": 1, "finished": 1}
    assert [(a["budget"], a["attack"], a["label"], a["acc"]["n"]) for a in table["aggregates"]
            ] == [("n50", "badnets", label, 1) for label in ("none", "ft", "awm")]
    assert len(table["rows"]) == 3
    assert [r["machine"] for r in table["rows"]] == [r["machine"] for r in cell["rows"]]
    markdown = (root / "out" / "table_a" / "table.md").read_text()
    assert "## n50" in markdown and "| badnets | ft |" in markdown
    assert (root / "out" / "table_a" / "table.png").stat().st_size > 0
    assert (root / "work" / "table_a" / "digits_badnets_n50_seed0" / "awm").is_dir()

    mtime = cell_path.stat().st_mtime_ns
    capsys.readouterr()
    out = _run(capsys, *argv)
    assert "[1/1] digits_badnets_n50_seed0: done, skipped" in out and "training" not in out
    assert cell_path.stat().st_mtime_ns == mtime
    out = _run(capsys, *[a if a != "--quiet" else "--dry-run" for a in argv])
    assert "digits_badnets_n50_seed0: done" in out and "badnets: trained" in out


def test_report_only_rewrites_the_table_from_cells_without_training(smoke_run, tmp_path,
                                                                    capsys):
    root, _, paths = smoke_run
    out_dir = tmp_path / "out"
    shutil.copytree(root / "out" / "table_a" / "cells", out_dir / "table_a" / "cells")
    cells_before = sorted(p.name for p in (out_dir / "table_a" / "cells").iterdir())
    # blend has no model and no cell: report-only neither trains it nor runs anything.
    argv = ["table-a", "--size", "smoke", "--attacks", "badnets", "blend", "--defenses", "ft",
            "awm", "--budgets", "n50", "--seeds", "0", "--quiet", "--report-only",
            "--models-dir", str(root / "zoo"), "--workdir", str(tmp_path / "work"),
            "--out", str(out_dir)]
    out = _run(capsys, *argv)
    assert "training" not in out and "running" not in out
    assert not (root / "zoo" / "digits" / "blend").exists() and not (tmp_path / "work").exists()
    assert sorted(p.name for p in (out_dir / "table_a" / "cells").iterdir()) == cells_before
    table = json.loads((out_dir / "table_a" / "table.json").read_text())
    assert table["cells"] == {"expected": 2, "finished": 1}
    assert [(a["attack"], a["label"], a["acc"]["n"]) for a in table["aggregates"]] == [
        ("badnets", "none", 1), ("badnets", "ft", 1), ("badnets", "awm", 1)]
    assert "1 of 2 cells are not finished yet." in (out_dir / "table_a" / "table.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        reproduction.main([*argv, "--dry-run"])
    assert exit_info.value.code == 2 and "pick one" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s; the sweep path it drives is covered in tests/sweep
def test_smoke_figure_d_sweeps_two_values(smoke_run, capsys):
    root, _, paths = smoke_run
    out = _run(capsys, "figure-d", "--size", "smoke", "--hparams", "alpha", "--quiet", *paths)
    assert "sweep alpha over (0.5, 0.9)" in out and "training" not in out
    figure_dir = root / "out" / "figure_d"
    sweep = json.loads((figure_dir / "sweep_alpha.json").read_text())
    assert sorted(r["alpha"] for r in sweep["rows"]) == [0.5, 0.9]
    figure = json.loads((figure_dir / "figure_d.json").read_text())
    assert [p["value"] for p in figure["points"]["alpha"]] == [0.5, 0.9]
    assert figure["points"]["alpha"][0]["acc"]["n"] == 1 and figure["defaults"]["alpha"] == 0.9
    assert "| 0.9 (default) |" in (figure_dir / "figure_d.md").read_text()
    assert (figure_dir / "figure_d.png").stat().st_size > 0
    out = _run(capsys, "figure-d", "--size", "smoke", "--hparams", "alpha", "--quiet", *paths)
    assert "sweep alpha: done, skipped" in out
