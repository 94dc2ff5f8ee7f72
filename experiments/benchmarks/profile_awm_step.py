"""Where an AWM step spends its time: a ``jax.profiler`` trace, summed per HLO op kind.

Builds the AWM steps of one ``performance.py`` case, warms them up, traces ``--steps`` calls
of the jitted trigger step and of the jitted mask step, and reads the trace back with
``jax.profiler.ProfileData``. Every executed HLO instruction is mapped, through the compiled
module's text, to a kind:

* ``conv forward`` / ``conv input-grad`` / ``conv weight-grad``: convolutions, told apart by
  their output (one that does not lead with the batch is a weight gradient) and ``op_name``
  metadata (``transpose(jvp(...))`` marks the input gradient). The ``fast`` conv's tap weight
  gradient is a set of dots under ``transpose``; they count as ``conv weight-grad``;
* ``dot`` (other matmuls), ``elementwise fusion`` (XLA's fused elementwise/reduction
  kernels, where BatchNorm, ReLU, the mask product and the optimizer live),
  ``copy/transpose`` (layout changes), and ``other``.

Convolutions on XLA CPU (jax 0.12) run inside ``ynn_fusion`` kernels (YNNPACK), some with
elementwise work fused in; a fusion takes the kind of the convolution or dot in its body.

Prints one JSON object per step kind: milliseconds per call in each kind, their share, and the
ten most expensive instructions. Timings under load are inflated, but the shares within one
trace are comparable.

    .venv/bin/python experiments/benchmarks/profile_awm_step.py --case resnet18_full_500 \
        --steps 2 --out experiments/results/profile_awm_step.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from performance import AWM_CASES, build_awm_case

from awm_jax.serialization import library_versions, write_json_atomic


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """``{computation name: its instruction lines}`` of a module's text."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            current = bodies.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(")


def _kind_of(line: str, batch: int, match: re.Match | None = None) -> str | None:
    """The kind of one convolution or dot instruction line (``match``: the line's
    :data:`_INSTRUCTION` match, if the caller has it), else None."""
    match = match or _INSTRUCTION.match(line)
    if not match:
        return None
    _, dims, opcode = match.groups()
    leading = int(dims.split(",")[0]) if dims else None
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ""
    if opcode == "convolution" or (opcode != "fusion" and "conv_general_dilated" in op_name):
        # lax's weight gradient inside a YNNPACK fusion carries no op_name; its output never
        # leads with the batch.
        if leading != batch:
            return "conv weight-grad"
        return "conv input-grad" if "transpose(" in op_name else "conv forward"
    if opcode == "dot":
        # The fast conv's weight gradient: per-tap matmuls under the conv's transpose.
        return "conv weight-grad" if "transpose(" in op_name and leading != batch else "dot"
    return None


def instruction_kinds(hlo_text: str, batch: int) -> dict[str, str]:
    """``{instruction name: kind}`` for the compiled module's text (see the module docstring).

    ``batch`` is the leading dimension of the step's activations: a backward conv or matmul
    whose output does not lead with it is a weight gradient. A fusion takes the kind of the
    convolution or dot inside it (YNNPACK fusions carry the op_name of their root, often an
    elementwise epilogue such as BatchNorm's multiply), else it is an elementwise fusion.
    """
    bodies = _computations(hlo_text)
    kinds = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, _, opcode = match.groups()
        if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
            continue
        kind = _kind_of(line, batch, match)
        if kind is None and opcode == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", line)
            inner = [_kind_of(body_line, batch)
                     for body_line in bodies.get(called.group(1) if called else "", [])]
            inner = [k for k in inner if k is not None]
            kind = inner[0] if inner else "elementwise fusion"
        elif kind is None and (opcode in ("copy", "transpose") or "transpose_copy" in name):
            kind = "copy/transpose"
        elif kind is None:
            kind = "other"
        kinds[name] = kind
    return kinds


def trace_events(trace_dir: str) -> list[tuple[str, float]]:
    """``(event name, duration in ms)`` of every event in the trace's host planes."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {trace_dir}.")
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    events = []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                events.append((event.name, event.duration_ns / 1e6))
    return events


def profile_step(jitted, args, steps: int, batch: int) -> dict:
    """Traces ``steps`` calls of ``jitted(*args)`` (after a warm-up) and sums them per kind."""
    compiled = jitted.lower(*args).compile()
    kinds = instruction_kinds(compiled.as_text(), batch)
    jax.block_until_ready(jitted(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(jitted(*args))
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
        events = trace_events(trace_dir)
    per_kind = collections.Counter()
    per_instruction = collections.Counter()
    for name, ms in events:
        kind = kinds.get(name)
        if kind is None:
            continue
        per_kind[kind] += ms / steps
        per_instruction[name] += ms / steps
    total = sum(per_kind.values())
    return {
        "ms_per_call": {k: round(v, 1) for k, v in per_kind.most_common()},
        "share": {k: round(v / total, 3) for k, v in per_kind.most_common()},
        # More traced than wall time means instructions overlapped (XLA CPU runs independent
        # thunks concurrently), so a kind's ms is its busy time, not its share of the wall.
        "traced_ms_per_call": round(total, 1),
        "wall_ms_per_call": round(wall_ms, 1),
        "top_instructions": [{"name": n, "kind": kinds[n], "ms": round(v, 1)}
                             for n, v in per_instruction.most_common(10)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="resnet18_full_500", choices=sorted(AWM_CASES))
    parser.add_argument("--conv-impl", default="fast")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mask-chunks", default="auto",
                        help="AWMConfig.mask_chunks: auto or an integer [default: auto]")
    parser.add_argument("--out")
    args = parser.parse_args()
    batch = AWM_CASES[args.case][3]
    mask_chunks = args.mask_chunks if args.mask_chunks == "auto" else int(args.mask_chunks)
    steps, _, hparams, frozen, data, state = build_awm_case(args.case, args.conv_impl,
                                                            mask_chunks=mask_chunks)
    state = jax.jit(steps.begin_epoch)(state, frozen, data, hparams)
    key = jax.random.key(1)
    chunks = steps.mask_chunks_for(state, frozen, data, hparams)
    result = {"case": args.case, "conv_impl": args.conv_impl, "steps": args.steps,
              "mask_chunks_used": chunks,
              "load_average": os.getloadavg(), "versions": library_versions(),
              "command": "python " + " ".join(sys.argv)}
    # The mask step runs the clean and the triggered batch as one batch of 2 * batch, split
    # into ``chunks`` forward/backward passes.
    for label, fn, rows in (("trigger_step", steps.trigger_step, batch),
                            ("mask_step", steps.mask_step, 2 * batch // chunks)):
        result[label] = profile_step(jax.jit(fn), (state, frozen, data, key, hparams),
                                     args.steps, rows)
        print(json.dumps({label: result[label]}), flush=True)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
