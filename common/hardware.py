"""Hardware discovery: CPUs, memory, GPUs (torch.cuda, plus NVML when installed) and robots.

    python -m common.hardware           # a table
    python -m common.hardware --json    # for scripts

Robots are found through discoverers that other packages register (`register_robot_discoverer`); the robot registry
in `robot_io` plugs in here, so this module never imports `robot_io` (dependencies point one way).
A discoverer returns a list of dicts with at least `type` and `name`; one that raises is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Callable

_robot_discoverers: dict[str, Callable[[], list[dict]]] = {}


def register_robot_discoverer(name: str, discover: Callable[[], list[dict]]) -> None:
    _robot_discoverers[name] = discover


def cpu_info() -> dict:
    import psutil

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "usable_cores": usable, "arch": platform.machine()}


def memory_info() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_gib": round(vm.total / 2**30, 1), "available_gib": round(vm.available / 2**30, 1)}


def _uuid(value) -> str:
    """torch's `props.uuid` and NVML's 'GPU-...' string in one form."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.lower().removeprefix("gpu-")


def gpu_info() -> list[dict]:
    gpus: list[dict] = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "compute_capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                             "source": "torch.cuda", **({"uuid": _uuid(p.uuid)} if hasattr(p, "uuid") else {})})
    except Exception as exc:  # a broken CUDA install should not hide the rest
        gpus.append({"error": f"torch.cuda: {exc}"})
    try:
        import pynvml  # from nvidia-ml-py, optional
    except ImportError:
        return gpus
    try:
        pynvml.nvmlInit()
    except Exception:
        return gpus  # no NVIDIA driver: nothing to add
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            # NVML counts every GPU of the machine in its own order; torch's indices follow CUDA_VISIBLE_DEVICES:
            # the two meet by UUID, and a GPU torch does not see is listed by its NVML index
            entry = None
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = _uuid(pynvml.nvmlDeviceGetUUID(h))
                entry = next((g for g in gpus if g.get("uuid") == uuid), None)
                if entry is None:
                    entry = {"nvml_index": i, "name": pynvml.nvmlDeviceGetName(h), "uuid": uuid, "source": "nvml",
                             "visible_to_torch": False}
                    gpus.append(entry)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                entry.update(memory_used_gib=round(mem.used / 2**30, 1), driver=driver)
                entry["utilization_pct"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except Exception as exc:  # e.g. NotSupported for utilisation on a MIG slice: the rest still counts
                error = f"{type(exc).__name__}: {exc}"
                if entry is None:
                    gpus.append({"nvml_index": i, "error": f"nvml: {error}"})
                else:
                    entry["nvml_error"] = error
    except Exception as exc:
        gpus.append({"error": f"nvml: {type(exc).__name__}: {exc}"})
    finally:
        pynvml.nvmlShutdown()
    return gpus


def robot_info() -> list[dict]:
    robots: list[dict] = []
    for name, discover in _robot_discoverers.items():
        try:
            robots += [{"discoverer": name, **r} for r in discover()]
        except Exception as exc:
            robots.append({"discoverer": name, "error": f"{type(exc).__name__}: {exc}"})
    return robots


def discover() -> dict:
    return {"cpu": cpu_info(), "memory": memory_info(), "gpus": gpu_info(), "robots": robot_info()}


def print_table(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Hardware on this machine")
    table.add_column("kind")
    table.add_column("what")
    table.add_column("details")
    c = info["cpu"]
    table.add_row("cpu", c["model"], f"{c['usable_cores']} usable / {c['logical_cores']} logical cores, {c['arch']}")
    m = info["memory"]
    table.add_row("memory", f"{m['total_gib']} GiB", f"{m['available_gib']} GiB available")
    for g in info["gpus"] or [{"name": "none"}]:
        details = ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("name",))
        table.add_row("gpu", str(g.get("name", g.get("error", "?"))), details)
    for r in info["robots"] or [{"name": "none registered here (robots: python -m robot_io.discover)"}]:
        details = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("name",))
        table.add_row("robot", str(r.get("name", r.get("error", "?"))), details)
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.hardware", description="List CPUs, memory, GPUs, robots.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = discover()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_table(info)


if __name__ == "__main__":
    main()
