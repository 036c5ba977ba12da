"""robot_io: robots as first-class hardware resources (RLinf-USER's hardware layer), CleanRL-sized.

- `registry`: robot types with config dataclasses, env-var autofill, `enumerate()` discovery and validation.
- `env`: one gymnasium interface for every back-end (pacing, safety box, caps, e-stop, intervention).
- back-ends: `dummy` (random, real-time paced), `sim` (ManiSkill), `franka` (franky; optional), `cameras`
  (RealSense; optional), `teleop` (keyboard, SpaceMouse).
- `remote`: robot servers that dial out to a learner's hub; `RemoteRobotEnv` drives them as gymnasium envs.
- CLIs: `python -m robot_io.serve`, `python -m robot_io.discover`.
Dependencies point one way: robot_io uses common/, never the reverse; optional SDKs are imported only when used.
"""
