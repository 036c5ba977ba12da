"""common.hardware: discovery, the robot hook, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

from common import hardware

ROOT = Path(__file__).resolve().parents[1]


def test_discover_reports_cpu_memory_gpus():
    info = hardware.discover()
    assert info["cpu"]["logical_cores"] >= 1 and info["cpu"]["usable_cores"] >= 1
    assert info["memory"]["total_gib"] > 0
    assert isinstance(info["gpus"], list)


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
    assert json.loads(out)["cpu"]["logical_cores"] >= 1
    table = subprocess.run([sys.executable, "-m", "common.hardware"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=120).stdout
    assert "memory" in table and "cpu" in table
