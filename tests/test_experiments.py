"""The experiment drivers build the commands they document (no training here)."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_backdoor_zoo_dry_run_orders_clb_after_its_clean_model():
    out = subprocess.run([sys.executable, "experiments/backdoor_zoo.py", "--dry-run",
                          "--datasets", "cifar10", "--attacks", "clb", "wanet"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert [line.split("--attack ")[1].split()[0] for line in lines] == ["none", "clb", "wanet"]
    assert "--clean-checkpoint runs/zoo/cifar10/clean" in lines[1]
    assert "--poison-rate 0.5" in lines[1] and "--poison-rate" not in lines[2]  # 0.1 default
    assert all("--model resnet18" in line and "--model-param width=16" in line for line in lines)


def test_backdoor_zoo_rejects_unknown_attacks():
    done = subprocess.run([sys.executable, "experiments/backdoor_zoo.py", "--dry-run",
                           "--attacks", "badnet"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown attacks ['badnet']; known:" in done.stderr


def test_backdoor_zoo_refuses_a_second_driver_on_the_same_models_dir(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".zoo.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([sys.executable, "experiments/backdoor_zoo.py", "--size", "smoke",
                               "--datasets", "digits", "--attacks", "badnets",
                               "--models-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                              cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"another backdoor_zoo.py is training into {tmp_path}" in done.stderr
    assert not (tmp_path / "digits").exists()


def test_backdoor_zoo_set_overrides_every_recipe_and_shows_in_the_commands():
    out = subprocess.run([sys.executable, "experiments/backdoor_zoo.py", "--dry-run",
                          "--datasets", "cifar10", "gtsrb", "--attacks", "badnets",
                          "--set", "epochs=3", "--set", "conv_impl=lax"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert all("--epochs 3" in line and "--conv-impl" not in line for line in lines)  # lax default


def test_backdoor_zoo_names_a_bad_override():
    zoo = _zoo_module()
    assert zoo.parse_overrides(["epochs=3", "flip=false", "milestones=5,9"]) == {
        "epochs": 3, "flip": False, "milestones": (5, 9)}
    for pair, message in [("epoch=3", "'epoch' is not a TrainConfig field"),
                          ("flip=maybe", "flip takes true or false"),
                          ("epochs=three", "epochs takes an integer"),
                          ("epochs", "expected KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            zoo.parse_overrides([pair])
    # A value of the right type that the TrainConfig refuses: a usage error from the driver.
    done = subprocess.run([sys.executable, "experiments/backdoor_zoo.py", "--dry-run",
                           "--set", "epochs=0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "epochs must be an integer >= 1" in done.stderr


def _script_module(relative_path: str):
    """Imports a script under experiments/ (not a package) as a module."""
    import importlib.util

    path = REPO_ROOT / "experiments" / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _zoo_module():
    return _script_module("backdoor_zoo.py")


def test_backdoor_zoo_jobs_run_in_parallel_clb_after_clean_and_failures_do_not_stop_others(
        tmp_path, monkeypatch):
    import threading
    import time

    zoo = _zoo_module()
    events, lock = [], threading.Lock()

    def fake_train(argv, model_dir, log):
        with lock:
            events.append(("start", model_dir.name, time.perf_counter()))
        time.sleep(0.3)
        with lock:
            events.append(("end", model_dir.name, time.perf_counter()))
        if model_dir.name == "blend":
            raise RuntimeError(f"training {model_dir} failed (exit 1); see {log}")

    monkeypatch.setattr(zoo, "_train", fake_train)
    tasks = [("d", name, tmp_path / "d" / name, ["awm-jax"], None, "src")
             for name in ("clean", "badnets", "blend", "clb")]
    tables = []
    failures = zoo._train_missing(tasks, tmp_path / "logs", jobs=3, table_only=False,
                                  on_done=tables.append)
    times = {(kind, name): t for kind, name, t in events}
    assert times[("start", "clb")] >= times[("end", "clean")]
    assert times[("start", "badnets")] < times[("end", "clean")]  # ran alongside
    assert len(failures) == 1 and "blend" in failures[0]
    assert ("end", "clb") in times and len(tables) == 4  # the table is rewritten per model


def test_default_run_benchmark_times_a_whole_tiny_run_and_its_parts(tmp_path):
    import json

    out = tmp_path / "default_run.json"
    subprocess.run([sys.executable, "experiments/benchmarks/default_run.py", "--width", "4",
                    "--n-clean", "20", "--outer-epochs", "2", "--test-size", "60", "--quiet",
                    "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                   check=True)
    run = json.loads(out.read_text())["run"]
    assert (run["n_clean"], run["eval_size"], run["outer_epochs"]) == (20, 40, 2)
    assert 0 < run["awm_seconds"] <= run["total_seconds"]
    assert run["evaluation_and_other_seconds"] >= 0
    assert set(run["after"]) >= {"acc", "asr", "asr_all", "ra"}


def test_default_run_benchmark_rejects_a_test_split_smaller_than_the_clean_draw():
    done = subprocess.run([sys.executable, "experiments/benchmarks/default_run.py",
                           "--n-clean", "500", "--test-size", "100"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "test_size (100) must exceed n_clean (500)" in done.stderr


def test_strided_input_grad_benchmark_covers_resnet18s_strided_convs_and_agrees(tmp_path):
    import json

    out = tmp_path / "strided.json"
    subprocess.run([sys.executable, "experiments/benchmarks/strided_input_grad.py", "--width",
                    "2", "--batch", "2", "--reps", "1", "--out", str(out)], cwd=REPO_ROOT,
                   capture_output=True, text=True, check=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["h_in"], r["c_in"], r["c_out"], r["kernel"]) for r in rows] == [
        (32, 2, 4, 3), (32, 2, 4, 1), (16, 4, 8, 3), (16, 4, 8, 1), (8, 8, 16, 3), (8, 8, 16, 1)]
    assert all(r["relative_error"] < 1e-5 and r["lax_ms"] > 0 and r["phases_ms"] > 0
               for r in rows)


def _zoo_row(dataset, attack, acc):
    return {"dataset": dataset, "attack": attack, "model": "small_cnn", "model_kwargs": {},
            "epochs": 1, "acc": acc, "asr": None, "asr_all": None, "ra": None,
            "poisoned_count": 0, "seconds": 60.0, "acc_target_met": True}


def test_backdoor_zoo_table_keeps_rows_of_models_outside_the_command(tmp_path):
    import json

    zoo = _zoo_module()
    first = [_zoo_row("gtsrb", "blend", 0.9), _zoo_row("cifar10", "badnets", 0.8)]
    zoo._write_table(tmp_path, first, "cpu", {("gtsrb", "blend"), ("cifar10", "badnets")})
    # A command narrowed to cifar10 blend and badnets: badnets is replaced, gtsrb blend kept.
    rows = zoo._write_table(tmp_path, [_zoo_row("cifar10", "badnets", 0.7),
                                       _zoo_row("cifar10", "blend", 0.6)], "cpu",
                            {("cifar10", "badnets"), ("cifar10", "blend")})
    table = json.loads((tmp_path / "results.json").read_text())
    assert table["rows"] == rows
    assert [(r["dataset"], r["attack"], r["acc"]) for r in rows] == [
        ("cifar10", "badnets", 0.7), ("cifar10", "blend", 0.6), ("gtsrb", "blend", 0.9)]
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 3
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="results.json is not a zoo table"):
        zoo._write_table(tmp_path, rows, "cpu", set())


def test_allocator_benchmark_alternates_allocators_and_names_a_missing_library(
        tmp_path, monkeypatch, capsys):
    import json

    allocator = _script_module("benchmarks/allocator.py")
    with pytest.raises(SystemExit):
        allocator.main(["--jemalloc", str(tmp_path / "missing.so")])
    assert "missing.so: no such file" in capsys.readouterr().err

    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    calls = []

    def fake_run_epoch(case, epochs, mask_chunks, env):
        calls.append((mask_chunks, env.get("LD_PRELOAD"), env.get("MALLOC_CONF")))
        return {"epoch_seconds": 5.0 if "LD_PRELOAD" in env else 6.0}

    monkeypatch.setattr(allocator, "run_epoch", fake_run_epoch)
    monkeypatch.setenv("LD_PRELOAD", "/some/other.so")  # never leaks into the glibc runs
    out = tmp_path / "allocator.json"
    allocator.main(["--jemalloc", str(library), "--mask-chunks", "auto,2", "--rounds", "2",
                    "--out", str(out)])
    conf = allocator.NO_PURGING
    assert calls == [(k, lib, c) for k in ("auto", "2") for _ in range(2)
                     for lib, c in ((None, None), (str(library), conf))]
    summary = json.loads(out.read_text())["epoch_seconds"]
    assert summary["resnet18_full_500 mask_chunks=2"] == {"glibc": [6.0, 6.0],
                                                          "jemalloc": [5.0, 5.0]}


def test_bf16_conv_benchmark_times_every_case_on_tiny_shapes(tmp_path):
    import json

    import jax
    import numpy as np
    from jax import lax

    bench = _script_module("benchmarks/bf16_conv.py")
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    for rebuilt in (bench._tap_dots, bench._im2col_dot):  # the dot forms compute the conv
        np.testing.assert_allclose(rebuilt(x, w, np.float32), want, rtol=1e-5, atol=1e-5)

    out = tmp_path / "bf16.json"
    subprocess.run([sys.executable, "experiments/benchmarks/bf16_conv.py", "--batch", "2",
                    "--size", "8", "--channels", "4", "--matmul", "16", "--reps", "1",
                    "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                   check=True)
    result = json.loads(out.read_text())
    names = {"conv_f32", "conv_bf16_f32_out", "conv_bf16", "conv_bf16_tap_dots",
             "conv_bf16_im2col_dot", "conv_grad_f32", "conv_grad_bf16", "matmul_f32",
             "matmul_bf16"}
    assert set(result["ms"]) == names == set(result["gflops"])
    assert all(value > 0 for value in result["gflops"].values())
    done = subprocess.run([sys.executable, "experiments/benchmarks/bf16_conv.py", "--reps", "0"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "at least 1" in done.stderr


_PROFILED_HLO = """\
%fused_wgrad (param_0: f32[32,32,32,64], param_1: f32[32,32,32,64]) -> f32[64,3,3,64] {
  %param_0 = f32[32,32,32,64]{3,2,1,0} parameter(0)
  %param_1 = f32[32,32,32,64]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[64,3,3,64]{3,2,1,0} convolution(%param_0, %param_1), window={size=32x32 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

%fused_forward (param_0: f32[32,32,32,64], param_1: f32[3,3,64,64]) -> f32[32,32,32,64] {
  %param_0 = f32[32,32,32,64]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,64,64]{3,2,1,0} parameter(1)
  %convolution.2 = f32[32,32,32,64]{3,2,1,0} convolution(%param_0, %param_1), dim_labels=b01f_01io->b01f, metadata={op_name="jit(mask_step)/jvp(ResNet18)/conv1/conv_general_dilated"}
  ROOT %multiply.1 = f32[32,32,32,64]{3,2,1,0} multiply(%convolution.2, %convolution.2)
}

%fused_slice (param_0: f32[32,34,34,64]) -> f32[32768,64] {
  %param_0 = f32[32,34,34,64]{3,2,1,0} parameter(0)
  ROOT %slice.1 = f32[32768,64]{1,0} slice(%param_0), slice={[0:32768], [0:64]}
}

ENTRY %main (x: f32[32,32,32,64], w: f32[3,3,64,64], g: f32[32,32,32,64]) -> f32[64,3,3,64] {
  %x = f32[32,32,32,64]{3,2,1,0} parameter(0)
  %ynn_fusion.1 = f32[64,3,3,64]{3,2,1,0} fusion(%x, %x), kind=kCustom, calls=%fused_wgrad, metadata={op_name="jit(mask_step)/transpose(jvp(ResNet18))/bn1/mul"}
  %ynn_fusion.2 = f32[32,32,32,64]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_forward, metadata={op_name="jit(mask_step)/jvp(ResNet18)/bn1/mul"}
  %convolution.3 = f32[32,32,32,64]{3,2,1,0} convolution(%g, %w), dim_labels=b01f_01io->b01f, metadata={op_name="jit(mask_step)/transpose(jvp(ResNet18))/conv1/conv_general_dilated"}
  %slice_fusion = f32[32768,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(mask_step)/slice"}
  %dot.1 = f32[64,64]{1,0} dot(%slice_fusion, %slice_fusion), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(mask_step)/transpose(jvp(ResNet18))/conv2/dot_general"}
  ROOT %copy.1 = f32[64,3,3,64]{0,3,2,1} copy(%ynn_fusion.1)
}
"""


def test_profile_classifies_fusions_by_the_convolution_inside(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments" / "benchmarks"))
    profile = _script_module("benchmarks/profile_awm_step.py")
    kinds = profile.instruction_kinds(_PROFILED_HLO, batch=32)
    # A YNNPACK fusion carries its elementwise root's op_name; its convolution decides.
    assert kinds["ynn_fusion.1"] == "conv weight-grad"
    assert kinds["ynn_fusion.2"] == "conv forward"
    assert kinds["convolution.3"] == "conv input-grad"
    assert kinds["slice_fusion"] == "elementwise fusion"
    assert kinds["dot.1"] == "conv weight-grad"
    assert kinds["copy.1"] == "copy/transpose"
