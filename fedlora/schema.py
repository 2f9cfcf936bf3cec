"""The config error and the small checks every typed config group uses (a leaf: imports nothing of fedlora).

Each group of the Hydra config tree is a frozen dataclass (``ModelSpec`` in ``task.model``, ``DataSpec`` in
``task.data``, ``PrivacySpec`` in ``privacy.calibrate``, the rest in ``fedlora.config``) that subclasses
``Group``: ``from_dict`` refuses unknown keys, and ``__post_init__`` checks every value once, raising a
``ConfigError`` that names the real key (``model.lora_r``), the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, TypeVar


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):  # picklable, so it crosses process pools and Ray intact
        return (type(self), (self.key, self.message))


def number(key: str, v: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, integer: bool = False, optional: bool = False) -> Any:
    """``v`` if it is a (finite) number within the bounds, else ``ConfigError(key, ...)``."""
    if v is None and optional:
        return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise ConfigError(key, f"got {v!r}; expected {'an integer' if integer else 'a number'}"
                          + (" or null" if optional else ""))
    if not math.isfinite(v):
        raise ConfigError(key, f"got {v!r}; expected a finite number")
    for bound, ok, op in ((gt, lambda b: v > b, ">"), (ge, lambda b: v >= b, ">="), (lt, lambda b: v < b, "<"),
                          (le, lambda b: v <= b, "<=")):
        if bound is not None and not ok(bound):
            raise ConfigError(key, f"got {v!r}; must be {op} {bound}")
    return v


def choice(key: str, v: Any, allowed: tuple | list) -> Any:
    if v not in allowed:
        raise ConfigError(key, f"got {v!r}; allowed values are {list(allowed)}")
    return v


def boolean(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"got {v!r}; expected true or false")
    return v


def doc(help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (shown by ``fedlora run --help``)."""
    return dataclasses.field(metadata={"help": help}, **kw)


G = TypeVar("G", bound="Group")


class Group:
    """Base of the typed config groups: strict ``from_dict`` / ``to_dict`` over dataclass fields."""

    KEY: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[G], d: dict[str, Any] | None) -> G:
        d = dict(d or {})
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{cls.KEY}.{unknown[0]}", f"unknown key; the keys of `{cls.KEY}` are {names}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return out

    def key(self, name: str) -> str:
        return f"{self.KEY}.{name}"

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
