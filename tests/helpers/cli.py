"""Running many short, independent command lines (the refusal checks of each script) side by side."""

import subprocess
from concurrent.futures import ThreadPoolExecutor


def run_each(commands: list[list[str]], *, cwd, timeout: float, workers: int = 2) -> list[subprocess.CompletedProcess]:
    """Each command's result, in order. Two at a time: each run is mostly Python importing torch, on one core."""
    def run(command):
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, commands))
