"""PyTorch-layout state_dicts of the reference networks, and their forward pass in numpy.

The forward passes follow the PyTorch modules (NCHW, OIHW weights, eval-mode BatchNorm,
``(C, H, W)`` flatten order) in float64, independently of our Flax models, so that agreement
checks the name mapping and every layout conversion of :mod:`awm_jax.interop.torch_import`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def _conv_weight(rng, out_ch, in_ch, size):
    return rng.normal(size=(out_ch, in_ch, size, size)) / np.sqrt(in_ch * size * size)


def _bn(rng, state, prefix, channels):
    state[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, channels)
    state[f"{prefix}.bias"] = 0.1 * rng.normal(size=channels)
    state[f"{prefix}.running_mean"] = 0.1 * rng.normal(size=channels)
    state[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, channels)
    state[f"{prefix}.num_batches_tracked"] = np.array(7, np.int64)


def _stages(width):
    """``(stage, block, in_channels, planes, stride)`` of the 18-layer ResNets."""
    in_ch = width
    for stage, (mult, stride) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
        for block in range(2):
            yield stage, block, in_ch, width * mult, stride if block == 0 else 1
            in_ch = width * mult


def resnet_state_dict(rng, width, num_classes, channels=3, preact=False):
    """Random weights with the names and shapes of kuangliu's ResNet-18 (or BackdoorBench's
    PreActResNet18 when ``preact``)."""
    state = {"conv1.weight": _conv_weight(rng, width, channels, 3)}
    if not preact:
        _bn(rng, state, "bn1", width)
    for stage, block, in_ch, planes, stride in _stages(width):
        prefix = f"layer{stage}.{block}"
        _bn(rng, state, f"{prefix}.bn1", in_ch if preact else planes)
        state[f"{prefix}.conv1.weight"] = _conv_weight(rng, planes, in_ch, 3)
        _bn(rng, state, f"{prefix}.bn2", planes)
        state[f"{prefix}.conv2.weight"] = _conv_weight(rng, planes, planes, 3)
        if stride != 1 or in_ch != planes:
            state[f"{prefix}.shortcut.0.weight"] = _conv_weight(rng, planes, in_ch, 1)
            if not preact:
                _bn(rng, state, f"{prefix}.shortcut.1", planes)
    state["linear.weight"] = rng.normal(size=(num_classes, 8 * width)) / np.sqrt(8 * width)
    state["linear.bias"] = 0.1 * rng.normal(size=num_classes)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}


def vgg_state_dict(rng, width, num_classes, channels=3, image_size=32):
    state, in_ch = {}, channels
    for conv in range(6):
        out_ch = width * (1, 2, 4)[conv // 2]
        index = 3 * conv + 2 * (conv // 2)
        state[f"features.{index}.weight"] = _conv_weight(rng, out_ch, in_ch, 3)
        state[f"features.{index}.bias"] = 0.1 * rng.normal(size=out_ch)
        _bn(rng, state, f"features.{index + 1}", out_ch)
        in_ch = out_ch
    features = in_ch * (image_size // 8) ** 2
    state["classifier.weight"] = rng.normal(size=(num_classes, features)) / np.sqrt(features)
    state["classifier.bias"] = 0.1 * rng.normal(size=num_classes)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in state.items()}


def conv2d(x, weight, stride=1, padding=1, bias=None):
    """NCHW convolution with an OIHW weight (cross-correlation, as PyTorch)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, _, height, width = x.shape
    _, _, kh, kw = weight.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((x.shape[0], weight.shape[0], out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            out += np.einsum("bchw,oc->bohw", patch, weight[:, :, i, j])
    return out if bias is None else out + bias[None, :, None, None]


def batch_norm(x, state, prefix):
    shape = (1, -1, 1, 1)
    mean = state[f"{prefix}.running_mean"].reshape(shape)
    var = state[f"{prefix}.running_var"].reshape(shape)
    return ((x - mean) / np.sqrt(var + EPS) * state[f"{prefix}.weight"].reshape(shape)
            + state[f"{prefix}.bias"].reshape(shape))


def relu(x):
    return np.maximum(x, 0.0)


def resnet_forward(state, x, width, preact=False):
    """Logits of kuangliu's ResNet-18 (or the PreAct variant) on NCHW ``x``."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    out = conv2d(x, s["conv1.weight"])
    if not preact:
        out = relu(batch_norm(out, s, "bn1"))
    for stage, block, _, _, stride in _stages(width):
        p = f"layer{stage}.{block}"
        has_shortcut = f"{p}.shortcut.0.weight" in s
        if preact:
            pre = relu(batch_norm(out, s, f"{p}.bn1"))
            shortcut = conv2d(pre, s[f"{p}.shortcut.0.weight"], stride, 0) if has_shortcut \
                else out
            y = conv2d(pre, s[f"{p}.conv1.weight"], stride)
            y = conv2d(relu(batch_norm(y, s, f"{p}.bn2")), s[f"{p}.conv2.weight"])
            out = y + shortcut
        else:
            y = relu(batch_norm(conv2d(out, s[f"{p}.conv1.weight"], stride), s, f"{p}.bn1"))
            y = batch_norm(conv2d(y, s[f"{p}.conv2.weight"]), s, f"{p}.bn2")
            shortcut = batch_norm(conv2d(out, s[f"{p}.shortcut.0.weight"], stride, 0), s,
                                  f"{p}.shortcut.1") if has_shortcut else out
            out = relu(y + shortcut)
    pooled = out.mean(axis=(2, 3))  # F.avg_pool2d(out, 4) on the 4x4 maps of a 32x32 input.
    return pooled @ s["linear.weight"].T + s["linear.bias"]


def vgg_forward(state, x):
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    out = x
    for conv in range(6):
        index = 3 * conv + 2 * (conv // 2)
        out = conv2d(out, s[f"features.{index}.weight"], bias=s[f"features.{index}.bias"])
        out = batch_norm(out, s, f"features.{index + 1}")
        out = np.where(out > 0, out, np.expm1(np.minimum(out, 0)))  # ELU
        if conv % 2 == 1:
            b, c, h, w = out.shape
            out = out.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    flat = out.reshape(out.shape[0], -1)  # (C, H, W) order, as torch's view
    return flat @ s["classifier.weight"].T + s["classifier.bias"]
