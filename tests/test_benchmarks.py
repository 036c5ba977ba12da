"""Benchmark commands run end to end at a tiny scale and write their .md / .json / .png."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_env_throughput_writes_its_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--only", "physics", "--workers", "1",
           "--steps-scale", "0.05", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT)
    data = json.loads((tmp_path / "env_throughput.json").read_text())
    assert [r["runner"] for r in data["rows"]] == ["bare simulator, in process", "our wrapper"]
    assert all(r["steps_per_s"] > 0 for r in data["rows"]) and data["seeds"] == [0]
    md = (tmp_path / "env_throughput.md").read_text()
    assert "| LIBERO spatial physics only |" in md and "Machine:" in md and "Command:" in md
    assert (tmp_path / "env_throughput.png").stat().st_size > 1000


def test_help_works():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--help"], check=True,
                         capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "--steps-scale" in out


def test_bad_flag_is_a_clear_error():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/env_throughput.py"), "--no-such-flag"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "no-such-flag" in (res.stderr + res.stdout)
