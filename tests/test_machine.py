"""The machine description saved with reports (awm_jax.machine)."""

import json
import os

import jax

from awm_jax import machine

ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx512f

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: Another CPU
"""


def test_cpu_name_takes_the_first_processor_with_family_and_model():
    assert machine.cpu_name(ZEN4_CPUINFO) == "AMD EPYC (family 25, model 17)"


def test_cpu_name_without_family_numbers_is_the_model_name():
    assert machine.cpu_name("processor\t: 0\nmodel name\t: Some ARM core\n") == "Some ARM core"


def test_cpu_name_of_empty_cpuinfo_falls_back_to_a_non_empty_name():
    assert machine.cpu_name("") != ""


def test_describe_machine_reports_this_process_as_json():
    described = machine.describe_machine()
    assert described["backend"] == jax.default_backend()
    assert described["device_count"] == len(jax.devices())
    assert described["devices"] == sorted({d.device_kind for d in jax.devices()})
    assert described["cpu_count"] == os.cpu_count()
    assert json.loads(json.dumps(described)) == described


def test_summary_names_the_host_and_any_accelerator():
    cpu = {"cpu": "AMD EPYC (family 25, model 17)", "cpu_count": 2, "backend": "cpu",
           "devices": ["cpu"], "device_count": 1}
    assert machine.summarize_machine(cpu) == "AMD EPYC (family 25, model 17), 2 cores"
    gpu = {**cpu, "cpu_count": 16, "backend": "gpu", "devices": ["NVIDIA H200"]}
    assert machine.summarize_machine(gpu) == (
        "1 x NVIDIA H200 (gpu); host AMD EPYC (family 25, model 17), 16 cores")
