"""Running many short, independent command lines (the refusal checks of each script) side by side."""

import subprocess
from concurrent.futures import ThreadPoolExecutor


def run_each(commands: list[list[str]], *, cwd, timeout: float, workers: int = 2) -> list[subprocess.CompletedProcess]:
    """Each command's result, in order. Two at a time: each run is mostly Python importing torch, on one core."""
    def run(command):
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, commands))


def assert_each_refused(cases: list[tuple[list[str], str]], make_command, *, cwd, timeout: float = 120.0) -> None:
    """Each (flags, message) case: `make_command(flags)` exits non-zero with `message` in its stderr, as a refusal
    (a traceback that happens to name the flag is a crash, not a clear error)."""
    outs = run_each([make_command(flags) for flags, _ in cases], cwd=cwd, timeout=timeout)
    for (flags, message), out in zip(cases, outs):
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, \
            (flags, out.stderr[-500:])
