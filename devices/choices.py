"""Closed vocabularies as enums, and the one way to turn a user's word into a member.

Every layer used to compare bare strings against its own tuple of allowed words; an enum
gives each vocabulary one definition, and `choose` one error message that lists the words.
"""
from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import ProjectableEdgeError

E = TypeVar("E", bound=Enum)


class StrEnum(str, Enum):
    """A str-valued enum that prints as its value on every Python >= 3.10 (enum.StrEnum is 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class CompileBackend(StrEnum):
    """How a device profile's graphs are compiled."""

    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"


class Arch(StrEnum):
    AARCH64 = "aarch64"
    X86_64 = "x86_64"


_ARCH_ALIASES = {"x86_64": Arch.X86_64, "amd64": Arch.X86_64, "aarch64": Arch.AARCH64, "arm64": Arch.AARCH64}


def host_arch(machine: str | None = None) -> str:
    """This machine's architecture in profile terms ('arm64' -> 'aarch64'); unknown names pass through."""
    import platform

    m = (machine or platform.machine()).lower()
    return str(_ARCH_ALIASES.get(m, m))


def values(enum_cls: type[Enum]) -> tuple[str, ...]:
    return tuple(str(m.value) for m in enum_cls)


def choose(enum_cls: type[E], value, what: str) -> E:
    """The member whose value is `value` (or the member itself); else an error listing the choices."""
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if member.value == value:
            return member
    raise ProjectableEdgeError(f"unknown {what} {value!r}: choose one of {', '.join(values(enum_cls))}")
