"""The registry of robot types: robots described, discovered and validated like GPUs (RLinf-USER's hardware layer).

A robot type registers a config dataclass and a class with
    enumerate(configs) -> list[RobotInfo]   discover what is attached and validate it (raises RobotValidationError)
    make(config) -> RobotBackend            open the robot
Config fields left unset (None), and the fields a config class lists in `ENV_FIELDS` while they are at their default
(real hardware: `GRIPPER_TYPE`, `CONTROL_HZ`, ...), fill from upper-cased environment variables (`ROBOT_IP`,
`CAMERA_SERIALS`, ...) unless the robot string names them; list items convert to the field's element type. Only
those: a stray `SEED` or `TASK` in a shell must not reconfigure a simulated robot, and a robot's `name` never
comes from the environment.
Several robots on one node: comma-separated values (`ROBOT_IP=10.0.0.2,10.0.0.3`); for a list field such as camera
serials, robots are separated by `;` and items by `,` (`CAMERA_SERIALS=111,222;333,444`). With no configs at all,
`configs_from_env` makes one robot per value of the type's `count_var` (e.g. `ROBOT_IP`).

`parse_robot("sim:PickCube")`, `parse_robot("dummy")`, `parse_robot("franka:ip=172.16.0.2")` turn a command-line
robot string into (type, config): `type[:target][,key=value...]` where target is the type's main field.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable


class RobotValidationError(RuntimeError):
    """A configured robot is not usable as configured; the message says what is missing and how to fix it."""


class MissingDependencyError(ImportError):
    """An optional package a back-end needs is not installed; the message names it and the install command."""


def require(module: str, package: str, purpose: str):
    """Import an optional dependency or raise MissingDependencyError naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the optional package {package!r} (import {module!r} failed: {exc}). "
            f"Install it with: pip install {package}") from exc


@dataclass
class RobotInfo:
    """What `enumerate` found: one usable robot."""

    type: str
    name: str
    config: Any
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"type": self.type, "name": self.name, **self.details}


@dataclass
class RobotType:
    name: str
    config_cls: type
    enumerate: Callable[[list], list[RobotInfo]]
    make: Callable[[Any], Any]
    target_field: str | None = None  # the field `type:target` sets (sim: task, franka: robot_ip)
    count_var: str | None = None  # the env var whose comma list sets how many robots a node has
    help: str = ""


ROBOT_TYPES: dict[str, RobotType] = {}


def register(name: str, config_cls: type, *, target_field: str | None = None, count_var: str | None = None,
             help: str = ""):
    """Class decorator: `@register("franka", FrankaConfig)` on a class with classmethods enumerate and make."""

    def wrap(cls):
        ROBOT_TYPES[name] = RobotType(name, config_cls, cls.enumerate, cls.make, target_field, count_var,
                                      help or (cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return wrap


def get_type(name: str) -> RobotType:
    _load_builtin_types()
    if name not in ROBOT_TYPES:
        raise KeyError(f"unknown robot type {name!r}; registered: {sorted(ROBOT_TYPES)}")
    return ROBOT_TYPES[name]


def _load_builtin_types() -> None:
    # importing a back-end module registers it; the real-hardware SDKs are imported lazily inside, so this is cheap
    from robot_io import dummy, franka, sim  # noqa: F401


# ------------------------------------------------------------------------------------------------ env-var autofill
_SCALAR_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}
_GIVEN_ATTR = "_robot_string_fields"  # set by parse_robot on its config: the fields the robot string named


def _field_kind(cls, f) -> tuple[str, str | None]:
    """(kind, item kind) of a config field: kind is list/bool/int/float/str; item kind is X of a `list[X]` field."""
    hint = typing.get_type_hints(cls).get(f.name, str)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`: X
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), str)
    if hint is list or typing.get_origin(hint) is list:
        item = (typing.get_args(hint) or (str,))[0]
        return "list", _SCALAR_KINDS.get(item, "str")
    return _SCALAR_KINDS.get(hint, "str"), None


def _convert_scalar(kind: str, text: str):
    if kind == "bool":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("1", "true", "yes")
    if kind == "float":
        return float(text)
    if kind == "int":
        return int(text)
    return text


def _convert(kind: tuple[str, str | None], text: str, source: str, sep: str = ","):
    """Text -> the field's type (list items separated by `sep`); `source` names where the text came from (`robot
    option x`, `environment variable X`) for the error."""
    kind_name, item_kind = kind
    text = text.strip()
    if kind_name != "list":
        try:
            return _convert_scalar(kind_name, text)
        except ValueError:
            raise RobotValidationError(f"{source}={text!r} is not a valid {kind_name}") from None
    items = [item.strip() for item in text.split(sep) if item.strip()]
    converted = []
    for item in items:
        try:
            converted.append(_convert_scalar(item_kind, item))
        except ValueError:
            raise RobotValidationError(f"{source}={text!r}: item {item!r} is not a valid {item_kind}") from None
    return converted


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# Never from the environment: a robot's name comes from its robot string or its type's default (`NAME` is set in
# some shells, e.g. WSL, and would give every robot of a node the same name).
NEVER_FROM_ENV = frozenset({"name"})


def fill_from_env(config, index: int = 0, environ: dict | None = None):
    """Fill every field that is None, or listed in the class's `ENV_FIELDS` and still at its default, and that the
    robot string did not name, from the environment variable of its upper-cased name (a robot string option wins over
    the environment). Robot `index` of a node takes the index-th comma item (list fields: the index-th `;` group).
    Returns the config."""
    environ = os.environ if environ is None else environ
    given = getattr(config, _GIVEN_ATTR, frozenset())
    env_fields = getattr(type(config), "ENV_FIELDS", ())
    # a type's count_var is each robot's identity (its arm's address): never shared between robots of a node
    identity_vars = {t.count_var for t in ROBOT_TYPES.values() if t.count_var and isinstance(config, t.config_cls)}
    for f in fields(config):
        var, value = f.name.upper(), getattr(config, f.name)
        if f.name in NEVER_FROM_ENV or var not in environ or f.name in given or \
                not (value is None or f.name in env_fields and value == _default(f)):
            continue
        kind = _field_kind(type(config), f)
        raw = environ[var]
        groups = raw.split(";") if kind[0] == "list" else raw.split(",")
        if len(groups) > 1 and not all(g.strip() for g in groups):  # (the robot count skips blanks: indices would
            # no longer match it)
            raise RobotValidationError(f"{var}={raw!r} has an empty value between its separators; give one value "
                                       f"per robot")
        if len(groups) == 1 and index > 0 and var in identity_vars:  # (one IP for two robots: both would drive one arm)
            raise RobotValidationError(f"{var}={raw!r} names one robot, but robot #{index} was asked for: each robot "
                                       f"needs its own {var} (comma-separated, one per robot)")
        if len(groups) == 1:
            value = groups[0]
        elif index < len(groups):
            value = groups[index]
        else:
            separators = "; between robots, commas between items" if kind[0] == "list" else "comma-separated"
            raise RobotValidationError(f"{var}={raw!r} lists {len(groups)} robots' values, but robot #{index} was "
                                       f"asked for; give one value per robot ({separators})")
        setattr(config, f.name, _convert(kind, value, f"environment variable {var}"))
    return config


def configs_from_env(type_name: str, environ: dict | None = None) -> list:
    """One config per robot the environment describes (the count is the number of values in the type's count_var)."""
    rtype = get_type(type_name)
    environ = os.environ if environ is None else environ
    count = 1
    if rtype.count_var and rtype.count_var in environ:
        count = len([v for v in environ[rtype.count_var].split(",") if v.strip()])
    return [fill_from_env(rtype.config_cls(), i, environ) for i in range(count)]


# ------------------------------------------------------------------------------------------------ robot strings
def parse_robot(text: str):
    """'sim:PickCube,obs_mode=rgb' -> (RobotType, config). Unknown keys and bad values are refused with the choices.
    List options separate items with `;` (`position_low=0.3;-0.3;0.05`)."""
    head, _, rest = text.partition(",")
    type_name, _, target = head.partition(":")
    rtype = get_type(type_name)
    kwargs: dict[str, Any] = {}
    if target:
        if not rtype.target_field:
            raise ValueError(f"robot type {type_name!r} takes no ':{target}' (use key=value options)")
        kwargs[rtype.target_field] = target
    names = {f.name: f for f in fields(rtype.config_cls)}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in names:
            raise ValueError(f"bad robot option {item!r} for {type_name!r}; options: {sorted(names)}")
        kind = _field_kind(rtype.config_cls, names[key])
        kwargs[key] = _convert(kind, value, f"robot option {key}", sep=";")  # `,` separates the options
    config = rtype.config_cls(**kwargs)
    setattr(config, _GIVEN_ATTR, frozenset(kwargs))  # so that fill_from_env leaves them alone
    return rtype, config


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


def enumerate_all(configs_by_type: dict[str, list] | None = None, environ: dict | None = None) -> list[dict]:
    """Every registered type's enumerate, on the given configs or on what the environment describes. A type with
    nothing configured finds nothing; a validation failure is reported as an entry with `error`, not raised."""
    _load_builtin_types()
    environ = os.environ if environ is None else environ
    found: list[dict] = []
    for name, rtype in sorted(ROBOT_TYPES.items()):
        configs = (configs_by_type or {}).get(name)
        if configs is None and not (rtype.count_var and rtype.count_var in environ):
            continue
        try:
            if configs is None:
                configs = configs_from_env(name, environ)  # a bad variable is reported like a failed validation
            found += [info.as_dict() for info in rtype.enumerate(configs)]
        except (RobotValidationError, MissingDependencyError) as exc:
            found.append({"type": name, "name": "?", "error": str(exc)})
    return found
