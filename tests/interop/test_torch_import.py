"""Tests for importing PyTorch state_dicts: logits against a numpy forward in PyTorch layout."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_reference import resnet_forward, resnet_state_dict, vgg_forward, vgg_state_dict

from awm_jax.checkpoint import load_model
from awm_jax.cli import main
from awm_jax.interop import import_state_dict, read_state_dict, torch_name
from awm_jax.models import apply_model

WIDTH, CLASSES = 2, 5
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _images(seed=0, batch=2, size=32, channels=3):
    return np.random.default_rng(seed).uniform(size=(batch, channels, size, size))


def _logits(model, variables, nchw):
    images = jnp.asarray(nchw.transpose(0, 2, 3, 1), jnp.float32)
    return np.asarray(apply_model(model, variables["params"], variables["batch_stats"], images)[0])


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "small_vgg"])
def test_numpy_state_dict_gives_the_reference_logits(name):
    rng = np.random.default_rng(1)
    if name == "small_vgg":
        state = vgg_state_dict(rng, WIDTH, CLASSES)
    else:
        state = resnet_state_dict(rng, WIDTH, CLASSES, preact=name == "preact_resnet18")
    model, variables = import_state_dict(state, name)
    assert (model.num_classes, model.width) == (CLASSES, WIDTH)  # inferred from the shapes
    x = _images()
    expected = vgg_forward(state, x) if name == "small_vgg" else \
        resnet_forward(state, x, WIDTH, preact=name == "preact_resnet18")
    np.testing.assert_allclose(_logits(model, variables, x), expected, rtol=1e-4, atol=1e-4)


def test_torch_names_follow_the_documented_tables():
    assert torch_name("resnet18", "params", ("stem_conv", "kernel")) == "conv1.weight"
    assert torch_name("resnet18", "batch_stats", ("layer2_block0", "shortcut_bn", "var")) == \
        "layer2.0.shortcut.1.running_var"
    assert torch_name("preact_resnet18", "params", ("layer3_block0", "shortcut_conv", "kernel")) \
        == "layer3.0.shortcut.0.weight"
    assert torch_name("small_vgg", "params", ("stage2_bn2", "scale")) == "features.12.weight"
    assert torch_name("small_vgg", "params", ("linear", "kernel")) == "classifier.weight"


def test_wrappers_prefixes_and_npz(tmp_path):
    state = resnet_state_dict(np.random.default_rng(2), WIDTH, CLASSES)
    wrapped = {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 91.0, "epoch": 3}
    assert read_state_dict(wrapped).keys() == state.keys()
    np.savez(tmp_path / "w.npz", **state)
    _, from_npz = import_state_dict(tmp_path / "w.npz", "resnet18")
    _, from_dict = import_state_dict(wrapped, "resnet18")
    jax.tree.map(np.testing.assert_array_equal, from_npz, from_dict)


def _state():
    return resnet_state_dict(np.random.default_rng(3), WIDTH, CLASSES)


@pytest.mark.parametrize("damage, match", [
    (lambda s: s.pop("layer1.0.bn2.running_var"), r"missing layer1\.0\.bn2\.running_var"),
    (lambda s: s.update({"fc.weight": np.zeros((2, 2))}), r"unexpected fc\.weight"),
    (lambda s: s.update({"layer4.1.conv2.weight": np.zeros((16, 16, 1, 1))}),
     r"layer4\.1\.conv2\.weight has shape \(16, 16, 1, 1\), expected \(16, 16, 3, 3\)"),
], ids=["missing", "unexpected", "shape"])
def test_bad_keys_are_listed_in_pytorch_names(damage, match):
    state = _state()
    damage(state)
    with pytest.raises(ValueError, match=match + ".*supported: preact_resnet18, resnet18"):
        import_state_dict(state, "resnet18")


def test_wrong_architecture_lists_the_problems():
    with pytest.raises(ValueError, match=r"does not fit preact_resnet18.*unexpected bn1\.bias"):
        import_state_dict(_state(), "preact_resnet18")
    with pytest.raises(ValueError, match=r"no PyTorch layout for model 'small_cnn'; supported"):
        import_state_dict(_state(), "small_cnn")
    with pytest.raises(ValueError, match=r"linear\.weight has shape \(5, 16\), expected \(7, 16\)"):
        import_state_dict(_state(), "resnet18", num_classes=7)


def test_missing_file_and_pytorch_file_without_torch(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth does not exist"):
        import_state_dict(tmp_path / "nowhere.pth", "resnet18")
    if HAS_TORCH:
        return
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ImportError, match=r"needs PyTorch.*awm-jax\[torch\].*\.npz"):
        import_state_dict(tmp_path / "w.pth", "resnet18")


def test_cli_import_torch_writes_a_model_directory(tmp_path, capsys):
    state = _state()
    np.savez(tmp_path / "w.npz", **state)
    assert main(["import-torch", "--state-dict", str(tmp_path / "w.npz"), "--model", "resnet18",
                 "--out", str(tmp_path / "model")]) == 0
    model, variables, metadata = load_model(tmp_path / "model")
    assert metadata["model"]["kwargs"]["width"] == WIDTH
    assert metadata["source"]["state_dict"].endswith("w.npz")
    x = _images(seed=4, batch=1)
    np.testing.assert_allclose(_logits(model, variables, x), resnet_forward(state, x, WIDTH),
                               rtol=1e-4, atol=1e-4)
    assert main(["import-torch", "--state-dict", str(tmp_path / "none.pth"), "--model",
                 "resnet18", "--out", str(tmp_path / "m2")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install 'awm-jax[torch]')")
def test_torch_module_matches_after_import(tmp_path):
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F

    class Block(tnn.Module):  # kuangliu's BasicBlock, written out for the test
        def __init__(self, in_ch, planes, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.shortcut = tnn.Sequential()
            if stride != 1 or in_ch != planes:
                self.shortcut = tnn.Sequential(tnn.Conv2d(in_ch, planes, 1, stride, bias=False),
                                               tnn.BatchNorm2d(planes))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class Net(tnn.Module):
        def __init__(self, width, classes):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(width)
            in_ch = width
            for stage, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
                blocks = [Block(in_ch, width * mult, stride), Block(width * mult, width * mult, 1)]
                setattr(self, f"layer{stage}", tnn.Sequential(*blocks))
                in_ch = width * mult
            self.linear = tnn.Linear(8 * width, classes)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            for stage in range(1, 5):
                out = getattr(self, f"layer{stage}")(out)
            return self.linear(F.avg_pool2d(out, 4).flatten(1))

    torch.manual_seed(0)
    net = Net(WIDTH, CLASSES)
    with torch.no_grad():  # non-trivial running statistics
        for module in net.modules():
            if isinstance(module, tnn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    net.eval()
    torch.save({"net": net.state_dict()}, tmp_path / "w.pth")
    x = _images(seed=5).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    model, variables = import_state_dict(tmp_path / "w.pth", "resnet18")
    np.testing.assert_allclose(_logits(model, variables, x), expected, rtol=1e-4, atol=1e-4)
