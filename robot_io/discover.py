"""One table of resources, USER's "robots alongside GPUs": CPUs, memory and GPUs (common.hardware), the robots
configured on this node (registry + enumerate, from ROBOT_IP / CAMERA_SERIALS / ... or --robot), and the robot
servers on the network (UDP beacons, or robots dialling a hub you bind with --listen).

    python -m robot_io.discover                          # local + beacons for 2 s
    python -m robot_io.discover --robot sim:PickCube --robot dummy
    python -m robot_io.discover --listen tcp://*:5600    # robots pointed at this address
    python -m robot_io.discover --json
"""

from __future__ import annotations

import argparse
import json

from common import hardware
from robot_io.registry import RobotValidationError, enumerate_all, fill_from_env, parse_robot
from robot_io.remote import BEACON_PORT, RobotHub, listen_beacons


def discover(robots: list[str] | None = None, wait: float = 2.0, port: int = BEACON_PORT,
             listen: str | None = None) -> dict:
    configs: dict[str, list] | None = None
    if robots:
        configs = {}
        for text in robots:
            rtype, config = parse_robot(text)
            configs.setdefault(rtype.name, []).append(fill_from_env(config))
    local = enumerate_all(configs)
    hardware.register_robot_discoverer("local", lambda: local)
    info = hardware.discover()
    network = [{"via": "beacon", **b} for b in listen_beacons(wait, port)] if wait > 0 else []
    if listen:
        hub = RobotHub(listen)
        try:
            import time

            time.sleep(max(wait, 1.5))
            network += [{"via": f"hub {listen}", "name": r.name, "type": r.spec.get("type"),
                         "control_hz": r.spec.get("control_hz"), "spec": r.spec} for r in hub.robots()]
        finally:
            hub.close()
    info["network_robots"] = network
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m robot_io.discover", description=__doc__.split("\n")[0])
    parser.add_argument("--robot", action="append", help="a robot to validate, e.g. sim:PickCube (repeatable)")
    parser.add_argument("--wait", type=float, default=2.0, help="seconds to listen for beacons (0: none)")
    parser.add_argument("--port", type=int, default=BEACON_PORT, help="UDP beacon port")
    parser.add_argument("--listen", help="also bind a hub here and list the robots that connect")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536 or args.wait < 0:
        parser.error(f"--port must be in 1..65535 and --wait >= 0, got {args.port} and {args.wait}")
    for text in args.robot or []:
        try:
            fill_from_env(parse_robot(text)[1])  # the same steps discover() takes, so a bad value fails here
        except (KeyError, ValueError, RobotValidationError) as exc:
            parser.error(f"--robot {text}: {exc.args[0] if exc.args else exc}")  # KeyError's str() adds quotes
    try:
        info = discover(args.robot, args.wait, args.port, args.listen)
    except ValueError as exc:  # a malformed --listen endpoint (or a port in use)
        parser.error(str(exc))
    except OSError as exc:  # the beacon port taken by another listener (a second discover, say)
        parser.error(f"cannot listen for beacons on UDP port {args.port}: {exc.strerror or exc} (another discover "
                     f"running? pick another --port, the one the robot servers' --beacon names)")
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    info_local = {k: v for k, v in info.items() if k != "network_robots"}
    hardware.print_table(info_local)
    table = Table(title="Robot servers on the network")
    for col in ("name", "type", "host", "via", "details"):
        table.add_column(col)
    for r in info["network_robots"]:
        details = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k in ("learner", "control_hz", "connected", "spec_hash"))
        spec = r.get("spec") or {}
        if spec.get("action"):
            try:
                obs = spec.get("observation", {}).get("dict", {})
                cams = ",".join(obs.get("images", {}).get("dict", {})) or "none"
                details += f", action {spec['action']['box']}, state {obs.get('state', {}).get('box')}, " \
                           f"cameras {cams}"
            except (AttributeError, KeyError, TypeError):  # a spec of another shape (another version, or junk)
                details += ", spec unreadable"
        table.add_row(str(r.get("name")), str(r.get("type")), str(r.get("host", r.get("address", ""))),
                      str(r.get("via")), details)
    if not info["network_robots"]:
        table.add_row("none heard", "", "", "", "start one with python -m robot_io.serve")
    Console().print(table)


if __name__ == "__main__":
    main()
