"""Reading a run's TensorBoard scalars back in tests (every event kept: no reservoir sampling)."""

from pathlib import Path


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalar_values(run_dir: Path, tag: str) -> list[float]:
    """The values logged under `tag` in `run_dir`'s event files, in step order of logging."""
    return [e.value for e in _events(run_dir).Scalars(tag)]


def scalar_points(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) for each value logged under `tag`."""
    return [(e.step, e.value) for e in _events(run_dir).Scalars(tag)]


def all_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag of the run with its values."""
    events = _events(run_dir)
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
