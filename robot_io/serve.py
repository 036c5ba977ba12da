"""Expose a robot to a learner over the network (the robot dials out; the learner binds).

    python -m robot_io.serve --robot sim:PickCube --learner tcp://LEARNER_HOST:5600
    python -m robot_io.serve --robot franka:172.16.0.2 --learner tcp://localhost:5600   # through an SSH tunnel
    python -m robot_io.serve --robot dummy --learner tcp://127.0.0.1:5600 --control-hz 50

The server announces its spec every --heartbeat seconds, answers reset/step/hold/estop, reconnects by itself after
an outage, and holds the arm when the learner is silent for --hold-after seconds. It also sends a UDP beacon
(--beacon, default LAN broadcast) so that `python -m robot_io.discover` finds it. Ctrl-C holds the arm and exits.
Robot names are unique per learner: a second server under a name that is already connected is refused (exit 3);
give each one its own --name. A restarted server takes its name back once the learner saw the old one go silent.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from common.transport import CurveConfig, HandshakeError
from robot_io.env import make_robot_env
from robot_io.registry import MissingDependencyError, RobotValidationError
from robot_io.remote import BEACON_PORT, RobotServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robot_io.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--robot", required=True, help="dummy | sim:TASK | franka:IP, with ,key=value options")
    parser.add_argument("--learner", required=True, help="the learner's RobotHub endpoint, e.g. tcp://HOST:5600")
    parser.add_argument("--robot-index", type=int, default=0,
                        help="which robot of this node, where environment variables list one value per robot "
                             "(ROBOT_IP=10.0.0.2,10.0.0.3: 1 is the second)")
    parser.add_argument("--name", help="robot name (default from the robot)")
    parser.add_argument("--control-hz", type=float, help="override the robot's control frequency (0: unpaced)")
    parser.add_argument("--max-episode-steps", type=int, help="override the episode cap")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between announces")
    parser.add_argument("--hold-after", type=float, default=2.0, help="hold the arm after this much learner silence")
    parser.add_argument("--beacon", default=f"255.255.255.255:{BEACON_PORT}",
                        help="UDP HOST:PORT for discovery beacons ('' disables)")
    parser.add_argument("--curve-secret", help="this robot's CurveZMQ secret key file (see common.transport keygen)")
    parser.add_argument("--curve-server-key", help="the learner's CurveZMQ public key file")
    parser.add_argument("--max-seconds", type=float, help="stop after this long (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(args.curve_secret) != bool(args.curve_server_key):
        parser.error("CurveZMQ needs both --curve-secret and --curve-server-key")
    for flag, path in (("--curve-secret", args.curve_secret), ("--curve-server-key", args.curve_server_key)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file (make key pairs with python -m common.transport keygen)")
    if args.control_hz is not None and args.control_hz < 0 or args.max_episode_steps is not None and \
            args.max_episode_steps < 1 or args.heartbeat <= 0 or args.hold_after <= 0 or args.robot_index < 0:
        parser.error("--control-hz must be >= 0 (0: unpaced), --max-episode-steps >= 1, --heartbeat and --hold-after "
                     "> 0, --robot-index >= 0")
    if args.heartbeat * 2 > args.hold_after:  # the learner's acks come once per heartbeat: any slower and a live
        # learner that thinks between steps reads as silent, and the arm is held mid-episode
        parser.error(f"--heartbeat {args.heartbeat:g} must be at most half of --hold-after {args.hold_after:g}")
    port = args.beacon.rpartition(":")[2]
    if args.beacon and not (":" in args.beacon and port.isdigit() and 0 < int(port) < 65536):
        parser.error(f"--beacon takes HOST:PORT (or '' for none), got {args.beacon!r}")
    try:
        env = make_robot_env(args.robot, args.robot_index, control_hz=args.control_hz,
                             max_episode_steps=args.max_episode_steps)
    except (RobotValidationError, MissingDependencyError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        curve = CurveConfig(args.curve_secret, args.curve_server_key) if args.curve_secret else None
        server = RobotServer(env, args.learner, name=args.name, heartbeat=args.heartbeat, hold_after=args.hold_after,
                             curve=curve, beacon=args.beacon or None)
    except (ValueError, OSError) as exc:  # a malformed --learner endpoint or key file: say so, close the robot
        env.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve(args.max_seconds)
    except HandshakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
