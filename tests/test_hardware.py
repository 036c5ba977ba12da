"""common.hardware: discovery, the robot hook, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from common import hardware

ROOT = Path(__file__).resolve().parents[1]


def test_discover_reports_cpu_memory_gpus():
    import psutil
    import torch

    info = hardware.discover()
    assert info["cpu"]["logical_cores"] == os.cpu_count()
    assert info["cpu"]["usable_cores"] == len(os.sched_getaffinity(0))  # what a taskset / cgroup leaves this process
    assert abs(info["memory"]["total_gib"] - psutil.virtual_memory().total / 2**30) < 0.1
    assert 0 < info["memory"]["available_gib"] <= info["memory"]["total_gib"]
    cuda = [g for g in info["gpus"] if "index" in g]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_a_failing_cuda_query_is_reported_and_the_rest_still_is(monkeypatch):
    import torch

    def broken():
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    info = hardware.discover()
    assert any("CUDA driver initialization failed" in g.get("error", "") for g in info["gpus"]), info["gpus"]
    assert info["cpu"]["logical_cores"] >= 1 and info["memory"]["total_gib"] > 0


def test_robot_discoverers_plug_in_and_failures_are_reported():
    hardware.register_robot_discoverer("fake", lambda: [{"type": "dummy_arm", "name": "arm0"}])
    hardware.register_robot_discoverer("broken", lambda: 1 / 0)
    try:
        robots = hardware.discover()["robots"]
        assert {"discoverer": "fake", "type": "dummy_arm", "name": "arm0"} in robots
        assert any(r.get("discoverer") == "broken" and "ZeroDivisionError" in r["error"] for r in robots)
    finally:
        hardware._robot_discoverers.pop("fake")
        hardware._robot_discoverers.pop("broken")


def test_cli_table_and_json():
    out = subprocess.run([sys.executable, "-m", "common.hardware", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert json.loads(out)["cpu"] == hardware.cpu_info()
    table = subprocess.run([sys.executable, "-m", "common.hardware"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
    c = hardware.cpu_info()
    assert f"{c['usable_cores']} usable / {c['logical_cores']} logical cores" in table and "GiB available" in table


def test_nvml_details_go_to_the_gpu_torch_sees_by_uuid_and_nvml_errors_are_reported(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1 on a 2-GPU machine: torch's GPU 0 is NVML's GPU 1. A query NVML does not support there
    (utilisation on a MIG slice) is reported, not raised."""
    import types

    import torch

    props = types.SimpleNamespace(name="H100", total_memory=80 * 2**30, major=9, minor=0, multi_processor_count=132,
                                  uuid="bbbb-2222")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)

    def utilization(h):
        if h == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return types.SimpleNamespace(gpu=50)

    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlSystemGetDriverVersion = lambda: "550.0"
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetUUID = lambda h: ["GPU-AAAA-1111", "GPU-BBBB-2222"][h]
    nvml.nvmlDeviceGetName = lambda h: ["A100", "H100"][h]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=[10, 20][h] * 2**30)
    nvml.nvmlDeviceGetUtilizationRates = utilization
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    seen, hidden = hardware.gpu_info()
    assert seen["index"] == 0 and seen["name"] == "H100" and seen["memory_used_gib"] == 20.0
    assert "NOT_SUPPORTED" in seen["nvml_error"]
    assert hidden["nvml_index"] == 0 and hidden["name"] == "A100" and hidden["visible_to_torch"] is False
    assert hidden["utilization_pct"] == 50 and "index" not in hidden
