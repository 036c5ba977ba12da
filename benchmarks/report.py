"""Writes a benchmark's results: benchmarks/results/<name>.md (table + machine, date, command, seeds),
<name>.json (the same figures) and, when the benchmark draws one, <name>.png."""

from __future__ import annotations

import datetime as dt
import io
import json
import platform
import shlex
import socket
import sys
from pathlib import Path

from common.fsutil import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Student t's 97.5% quantile by degrees of freedom (n - 1), 1..30; beyond, 2.042 (that of 30: a little wide)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_interval(values) -> float:
    """Half-width of the 95% t-interval of the mean over seeds (0 with one seed)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return T_975[min(n - 1, len(T_975)) - 1] * sd / n ** 0.5


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, chosen by the OS (below 60000): fixed ports collide with another run of
    the same benchmark, or anything else, on the machine."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 60000:
            return port


def utc_date(timestamp: float | None = None) -> str:
    """'YYYY-MM-DD HH:MM UTC' of `timestamp` (seconds since the epoch; now if None): the date a result states."""
    when = dt.datetime.now(dt.timezone.utc) if timestamp is None else \
        dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> dict:
    import torch

    from common.hardware import cpu_info, gpu_info, memory_info

    gpus = [g["name"] for g in gpu_info() if "name" in g]
    return {
        "cpu": cpu_info()["model"],
        "cores": cpu_info()["usable_cores"],
        "ram_gib": memory_info()["total_gib"],
        "gpu": ", ".join(gpus) or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


def load_algo(name: str):
    """Import `algos/<name>.py` as a module (scripts are not a package: CleanRL style)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "algos" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, columns: list[str], rows: list[dict], *, seeds, notes: str = "",
                  out_dir: Path | str = RESULTS_DIR, figure=None, extra: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": name,
        "date": utc_date(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "seeds": list(seeds),
        "machine": machine_info(),
    }
    m = meta["machine"]
    md = [
        f"# {title}", "",
        markdown_table(columns, rows), "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Seeds: {', '.join(map(str, meta['seeds']))}",
    ]
    if notes:
        md += ["", notes.strip()]
    if figure is not None:
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=120, bbox_inches="tight")
        atomic_write(out_dir / f"{name}.png", png.getvalue())
        md += ["", f"![{name}]({name}.png)"]
    # atomic: some benchmarks keep their earlier runs in the JSON alone, and read it back on the next call
    atomic_write(out_dir / f"{name}.md", "\n".join(md) + "\n")
    atomic_write(out_dir / f"{name}.json",
                 json.dumps({**meta, "columns": columns, "rows": rows, **(extra or {})}, indent=2) + "\n")
    return out_dir / f"{name}.md"
