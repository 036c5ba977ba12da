"""Cameras with latest-frame capture: a thread grabs frames as fast as the camera delivers and keeps only the newest,
so a control step never reads a stale, queued frame (RLinf's BaseCamera). RealSense through `pyrealsense2`
(optional: `pip install pyrealsense2`)."""

from __future__ import annotations

import threading
import time

import numpy as np

from robot_io.registry import require


class LatestFrameCamera:
    """Runs `grab() -> HxWx3 uint8` on a thread; `read()` returns the newest frame (waits for the first one)."""

    def __init__(self, name: str, image_size: int | None = None):
        self.name, self.image_size = name, image_size
        self._frame: np.ndarray | None = None
        self._stamp = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.frames = 0
        self.errors = 0  # failed grabs (each retried)
        self._thread = threading.Thread(target=self._loop, name=f"camera-{name}", daemon=True)

    def start(self) -> "LatestFrameCamera":
        self._thread.start()
        return self

    def grab(self) -> np.ndarray:
        raise NotImplementedError

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                frame = self.grab()
            except Exception as exc:  # a dropped frame or a USB hiccup: try again, backing off; read() reports it
                self._error, failures = exc, min(failures + 1, 7)  # backing off to 1 s at most
                self.errors += 1
                self._stop.wait(min(0.01 * 2 ** failures, 1.0))
                continue
            self._error, failures = None, 0
            if self.image_size and frame.shape[:2] != (self.image_size, self.image_size):
                frame = resize_center(frame, self.image_size)
            with self._lock:
                self._frame, self._stamp = frame, time.monotonic()
                self.frames += 1

    def read(self, timeout: float = 2.0, max_age: float | None = None) -> np.ndarray:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                frame, stamp = self._frame, self._stamp
            if frame is not None and (max_age is None or time.monotonic() - stamp <= max_age):
                return frame
            if time.monotonic() > deadline:
                error = self._error
                raise TimeoutError(f"camera {self.name}: no frame" + ("" if max_age is None else
                                   f" newer than {max_age:.2f} s") + f" within {timeout:.1f} s" +
                                   (f" (grabbing fails: {type(error).__name__}: {error})" if error else ""))
            time.sleep(0.002)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def resize_center(frame: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize (nearest neighbour; no OpenCV needed)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = frame[top:top + side, left:left + side]
    idx = (np.arange(size) * side / size).astype(int)
    return np.ascontiguousarray(crop[idx][:, idx])


def realsense_serials() -> list[str]:
    rs = require("pyrealsense2", "pyrealsense2", "RealSense cameras")
    return [dev.get_info(rs.camera_info.serial_number) for dev in rs.context().query_devices()]


class RealSenseCamera(LatestFrameCamera):
    """One RealSense by serial: colour stream (640x480 at 15 fps by default, RLinf's CameraInfo)."""

    def __init__(self, serial: str, name: str | None = None, image_size: int | None = 128, width: int = 640,
                 height: int = 480, fps: int = 15):
        super().__init__(name or serial, image_size)
        rs = require("pyrealsense2", "pyrealsense2", "RealSense cameras")
        self.pipeline, config = rs.pipeline(), rs.config()
        config.enable_device(serial)
        config.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        self.pipeline.start(config)

    def grab(self) -> np.ndarray:
        frames = self.pipeline.wait_for_frames(2000)
        return np.asanyarray(frames.get_color_frame().get_data()).copy()

    def close(self) -> None:
        super().close()
        self.pipeline.stop()
