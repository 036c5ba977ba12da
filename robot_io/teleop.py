"""Intervention devices: a human may take over the action at any step (HIL-SERL). `poll()` returns the human's action
for this step, or None when the policy keeps control; `estop_requested` asks the env for an emergency stop.

- `KeyboardIntervention`: terminal keys (works over SSH, testable anywhere: keys come from any `read_keys` callable).
  `i` toggles intervention; while on, w/s x, a/d y, r/f z, q/e yaw, space toggles the gripper; `x` is emergency stop.
- `SpaceMouseIntervention`: a 3Dconnexion SpaceMouse through `pyspacemouse` (optional: `pip install pyspacemouse`);
  intervening while the puck is deflected past a dead zone or a button is held (left closes, right opens).
Only one device is active at a time (RLinf's rule), so an env takes one `intervention=`.
"""

from __future__ import annotations

import os
import select
import sys
import threading

import numpy as np

from robot_io.registry import require

KEYMAP = {"w": (0, 1.0), "s": (0, -1.0), "a": (1, 1.0), "d": (1, -1.0), "r": (2, 1.0), "f": (2, -1.0),
          "q": (5, 1.0), "e": (5, -1.0)}


def terminal_keys(stream=None):
    """A non-blocking reader of single key presses from a terminal (cbreak mode; restored at exit)."""
    import atexit
    import termios
    import tty

    stream = stream or sys.stdin
    if not stream.isatty():
        raise RuntimeError("keyboard intervention needs an interactive terminal (stdin is not a TTY); run the actor "
                           "in a terminal, or pass read_keys= a callable of your own")
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    atexit.register(termios.tcsetattr, fd, termios.TCSADRAIN, saved)

    def read_keys() -> str:
        keys = ""
        while select.select([fd], [], [], 0)[0]:
            keys += os.read(fd, 64).decode(errors="ignore")
        return keys

    return read_keys


class KeyboardIntervention:
    def __init__(self, action_dim: int = 7, step: float = 1.0, read_keys=None, gripper_index: int = -1):
        self.action_dim, self.step, self.gripper_index = action_dim, step, gripper_index % action_dim
        self.read_keys = read_keys or terminal_keys()
        self.active, self.gripper, self.estop_requested = False, 1.0, False

    def poll(self) -> np.ndarray | None:
        action = np.zeros(self.action_dim, np.float32)
        for key in self.read_keys().lower():
            if key == "i":
                self.active = not self.active
            elif key == "x":
                self.estop_requested = True
            elif key == " ":
                self.gripper, self.active = -self.gripper, True
            elif key in KEYMAP and KEYMAP[key][0] < self.action_dim:
                idx, sign = KEYMAP[key]
                action[idx] = np.clip(action[idx] + sign * self.step, -1, 1)
                self.active = True
        if not self.active:
            return None
        action[self.gripper_index] = self.gripper
        return action


class SpaceMouseIntervention:
    def __init__(self, action_dim: int = 7, dead_zone: float = 0.1, scale: float = 1.0):
        self.spacemouse = require("pyspacemouse", "pyspacemouse", "SpaceMouse intervention")
        if not self.spacemouse.open():
            raise RuntimeError("no SpaceMouse found (check the USB connection and the udev rule for hidraw access)")
        self.action_dim, self.dead_zone, self.scale = action_dim, dead_zone, scale
        self.estop_requested, self.gripper = False, 1.0
        self._state, self._lock, self._stop = None, threading.Lock(), threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="spacemouse", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # pyspacemouse reads non-blocking: at 200 Hz (the control loop runs at 10-20) the thread leaves the core and
        # the interpreter lock to the control loop instead of spinning
        try:
            while not self._stop.wait(0.005):
                state = self.spacemouse.read()
                with self._lock:
                    self._state = state
        except Exception as exc:  # unplugged: poll() says so rather than replaying the last motion
            with self._lock:
                self._state, self._error = None, exc

    def poll(self) -> np.ndarray | None:
        with self._lock:
            s, error = self._state, self._error
        if error is not None:
            raise RuntimeError(f"SpaceMouse stopped: {type(error).__name__}: {error}") from error
        if s is None:
            return None
        axes = np.array([s.y, -s.x, s.z, -s.roll, -s.pitch, -s.yaw], np.float32) * self.scale
        axes[np.abs(axes) < self.dead_zone] = 0.0
        buttons = list(getattr(s, "buttons", []) or [])
        if buttons[:1] == [1]:
            self.gripper = -1.0
        elif buttons[1:2] == [1]:
            self.gripper = 1.0
        if not np.any(axes) and not any(buttons):
            return None
        action = np.zeros(self.action_dim, np.float32)
        n = min(6, self.action_dim - 1)
        action[:n] = np.clip(axes[:n], -1, 1)
        action[-1] = self.gripper
        return action

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self.spacemouse.close()
