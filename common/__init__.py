"""The thin shared layer: env wrappers, worker processes, and (later) transport, weight sync and the replay buffer.
No algorithm logic lives here; `algos/` imports this package, never the reverse."""
