"""What machine produced a result: the CPU, its cores and JAX's devices, for saved reports.

Wall times in a report mean little without the machine that took them, and a study collected
over several sessions mixes machines (two CPUs of the same core count can differ by 2x).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Mapping

CPUINFO = Path("/proc/cpuinfo")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with the family and model numbers where Linux reports them.

    Cloud CPUs often report only a brand ("AMD EPYC"); the family and model numbers tell
    their generations apart (family 25 is Zen 3/4, 26 is Zen 5).

    Args:
      cpuinfo: the text of ``/proc/cpuinfo``; None reads it where it exists.

    Returns:
      e.g. ``"AMD EPYC (family 25, model 17)"``; without ``/proc/cpuinfo``,
      ``platform.processor()`` or ``"unknown CPU"``.
    """
    if cpuinfo is None and CPUINFO.is_file():
        cpuinfo = CPUINFO.read_text(errors="replace")
    fields: dict[str, str] = {}
    for line in (cpuinfo or "").splitlines():
        if not line.strip():  # the first processor's block is enough.
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe_host() -> dict[str, Any]:
    """The host without asking JAX (for scripts that must not start it): ``{"cpu",
    "cpu_count", "platform"}``."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}


def describe_machine() -> dict[str, Any]:
    """The machine this process runs on, as JSON-ready fields.

    Returns:
      ``{"cpu", "cpu_count", "platform", "backend", "devices", "device_count"}``: the CPU
      (:func:`cpu_name`), its logical cores, the OS, JAX's default backend, the kinds of its
      devices (e.g. ``["NVIDIA H200"]``; ``["cpu"]`` on the CPU) and how many there are.
    """
    import jax

    devices = jax.devices()
    return {**describe_host(), "backend": jax.default_backend(),
            "devices": sorted({device.device_kind for device in devices}),
            "device_count": len(devices)}


def summarize_machine(machine: Mapping[str, Any]) -> str:
    """One line for a :func:`describe_machine` dict: ``"AMD EPYC (family 25, model 17), 2
    cores"`` on the CPU backend, ``"1 x NVIDIA H200 (gpu); host AMD EPYC ..., 16 cores"``
    on an accelerator."""
    host = f"{machine['cpu']}, {machine['cpu_count']} cores"
    if machine["backend"] == "cpu":
        return host
    kinds = ", ".join(machine["devices"])
    return f"{machine['device_count']} x {kinds} ({machine['backend']}); host {host}"
