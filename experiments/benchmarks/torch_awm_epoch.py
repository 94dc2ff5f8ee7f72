"""One AWM epoch in plain PyTorch with the same work as ours, to compare frameworks same-day.

The issue quotes ~119 s for the official PyTorch code's AWM epoch (ResNet-18, 500 images, batch
128) on this machine on another day; the machine's speed drifts (its float32 matmul ceiling read
205 GFLOP/s then, 119 on 2026-11-26), so this script times PyTorch on our epoch's exact
schedule at the same moment as ours. Per epoch, as :func:`awm_jax.defenses.awm.make_awm_steps`
with the official defaults (``inner_passes=5``, batch 128, ``mask_scope="conv"``,
``inner_labels="predicted"``, ``mask_selection="last"``):

* predictions of the masked model on the N clean images (one forward each, no gradient);
* ``T = (N // 128) * 5`` trigger steps: a forward of 128 triggered images and the gradient of
  their cross-entropy with respect to the trigger only;
* ``T`` mask steps: one forward of the 128 clean and 128 triggered images together (eval-mode
  BatchNorm) and the gradient of ``alpha*CE + (1-alpha)*CE + gamma*|m|_1`` with respect to the
  conv masks, an Adam step and a clip to [0, 1].

The network is the CIFAR ResNet-18 (kuangliu's layout, as ``awm_jax.models`` ``resnet18``)
written functionally so that every conv weight is ``weight * mask``; weights are random, which
does not change the time. Prints JSON; ``--channels-last`` uses PyTorch's NHWC memory format.

    /path/to/venv-with-torch/bin/python experiments/benchmarks/torch_awm_epoch.py \\
        --out experiments/results/torch_awm_epoch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from awm_jax.machine import describe_host


def _resnet18_weights(width: int, num_classes: int, generator: torch.Generator) -> dict:
    def conv(out_ch, in_ch, size):
        return torch.randn(out_ch, in_ch, size, size, generator=generator) / (in_ch * size ** 2) ** .5

    def bn(channels):
        return {"weight": torch.ones(channels), "bias": torch.zeros(channels),
                "mean": torch.zeros(channels), "var": torch.ones(channels)}

    weights = {"conv1": conv(width, 3, 3), "bn1": bn(width), "blocks": []}
    in_ch = width
    for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
        for block in range(2):
            out_ch = width * mult
            s = stride if block == 0 else 1
            entry = {"stride": s, "conv1": conv(out_ch, in_ch, 3), "bn1": bn(out_ch),
                     "conv2": conv(out_ch, out_ch, 3), "bn2": bn(out_ch)}
            if s != 1 or in_ch != out_ch:
                entry["shortcut"] = conv(out_ch, in_ch, 1)
                entry["bn_shortcut"] = bn(out_ch)
            weights["blocks"].append(entry)
            in_ch = out_ch
    weights["linear_w"] = torch.randn(num_classes, in_ch, generator=generator) / in_ch ** .5
    weights["linear_b"] = torch.zeros(num_classes)
    return weights


def _conv_names(weights: dict) -> list[tuple]:
    names = [("conv1",)]
    for index, block in enumerate(weights["blocks"]):
        names += [("blocks", index, name) for name in ("conv1", "conv2", "shortcut")
                  if name in block]
    return names


def _get(weights, path):
    for key in path:
        weights = weights[key]
    return weights


def _bn(x, p):
    return F.batch_norm(x, p["mean"], p["var"], p["weight"], p["bias"], training=False)


def forward(weights: dict, masks: dict, x: torch.Tensor) -> torch.Tensor:
    """The masked ResNet-18: every conv weight multiplied by its mask."""
    def conv(path, inputs, stride=1):
        weight = _get(weights, path) * masks[path]
        return F.conv2d(inputs, weight, stride=stride, padding=weight.shape[-1] // 2)

    out = F.relu(_bn(conv(("conv1",), x), weights["bn1"]))
    for index, block in enumerate(weights["blocks"]):
        h = F.relu(_bn(conv(("blocks", index, "conv1"), out, block["stride"]), block["bn1"]))
        h = _bn(conv(("blocks", index, "conv2"), h), block["bn2"])
        shortcut = out
        if "shortcut" in block:
            shortcut = _bn(conv(("blocks", index, "shortcut"), out, block["stride"]),
                           block["bn_shortcut"])
        out = F.relu(h + shortcut)
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return F.linear(out, weights["linear_w"], weights["linear_b"])


def awm_epoch(weights, masks, optimizer, images, labels, batch_size, inner_passes, generator,
              alpha=0.9, gamma=1e-8, trigger_lr=10.0, tau=1000.0):
    count = images.shape[0]
    steps = max(1, count // batch_size) * inner_passes
    with torch.no_grad():
        inner_labels = torch.cat([forward(weights, masks, chunk).argmax(-1)
                                  for chunk in images.split(batch_size)])
    trigger = torch.zeros(images.shape[1:], requires_grad=True)
    for _ in range(steps):
        index = torch.randint(0, count, (batch_size,), generator=generator)
        loss = F.cross_entropy(forward(weights, masks, images[index] + trigger),
                               inner_labels[index])
        (grad,) = torch.autograd.grad(loss, trigger)
        with torch.no_grad():
            trigger += trigger_lr * grad
    with torch.no_grad():
        norm = trigger.abs().sum()
        if norm > tau:
            trigger *= tau / norm
    trigger = trigger.detach()
    for _ in range(steps):
        index = torch.randint(0, count, (batch_size,), generator=generator)
        clean = images[index]
        both = torch.cat([clean, (clean + trigger).clamp(0, 1)])
        logits = forward(weights, masks, both)
        clean_logits, triggered_logits = logits.split(batch_size)
        l1 = sum(m.abs().sum() for m in masks.values())
        loss = (alpha * F.cross_entropy(clean_logits, labels[index])
                + (1 - alpha) * F.cross_entropy(triggered_logits, labels[index]) + gamma * l1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for mask in masks.values():
                mask.clamp_(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--n-clean", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--inner-passes", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after a warm-up one")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    weights = _resnet18_weights(args.width, 10, generator)
    masks = {path: torch.ones_like(_get(weights, path), requires_grad=True)
             for path in _conv_names(weights)}
    images = torch.rand(args.n_clean, 3, 32, 32, generator=generator)
    labels = torch.arange(args.n_clean) % 10
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(masks.values(), lr=0.01)
    epoch = lambda: awm_epoch(weights, masks, optimizer, images, labels,
                              args.batch_size, args.inner_passes, generator)
    start = time.perf_counter()
    epoch()
    first = time.perf_counter() - start
    seconds = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        epoch()
        seconds.append(time.perf_counter() - start)
    result = {"machine": {**describe_host(), "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__},
              "command": "python experiments/benchmarks/torch_awm_epoch.py "
                         + " ".join(os.sys.argv[1:]),
              "width": args.width, "n_clean": args.n_clean, "batch_size": args.batch_size,
              "steps_per_phase": max(1, args.n_clean // args.batch_size) * args.inner_passes,
              "channels_last": args.channels_last, "first_epoch_seconds": round(first, 2),
              "epoch_seconds": round(statistics.median(seconds), 2),
              "all_epoch_seconds": [round(s, 2) for s in seconds]}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
