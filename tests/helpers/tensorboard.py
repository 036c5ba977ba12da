"""Reading a run's TensorBoard scalars back in tests."""

from pathlib import Path


def scalar_values(run_dir: Path, tag: str) -> list[float]:
    """The values logged under `tag` in `run_dir`'s event files, in step order of logging."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]
