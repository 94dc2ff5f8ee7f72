"""The experiment drivers build the commands they document (no training here)."""

import subprocess
import sys

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
