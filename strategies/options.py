"""A merge rule's options, declared once: name, type, default, valid range and one line of help.

The CLI flags, the ``[tool.flwr.app.config]`` keys, validation and the table of rules (docs/merge-rules.md) are all derived
from these declarations (mergekit's idea: a method is a function plus its declared parameters), so an option
cannot mean one thing on the command line and another in a deployment. A value is refused with ``OptionError``,
one line naming the key, the value and what was expected.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass


class OptionError(ValueError):
    """A merge rule or one of its options has a value no run can use (one line)."""


@dataclass(frozen=True)
class Option:
    """One option of a rule; its key everywhere (flag, run config, results.json) is ``<rule>-<name>``."""

    name: str
    kind: type  # float, int or bool
    default: float | int | bool
    help: str
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (float, int, bool):
            raise TypeError(f"option {self.name!r}: kind must be float, int or bool, not {self.kind}")
        if self.kind is not bool:
            self.check(self.name, self.default)

    @property
    def parameter(self) -> str:
        """The keyword the rule function takes it as (``lambda`` -> ``lambda_``, PEP 8's way around keywords)."""
        name = self.name.replace("-", "_")
        return name + "_" if keyword.iskeyword(name) else name

    @property
    def range_text(self) -> str:
        if self.kind is bool:
            return "true or false"
        noun = "an integer" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return f"{noun} {' and '.join(parts)}" if parts else noun

    def parse(self, key: str, value: object) -> float | int | bool:
        """The value as this option's type, checked against its range; OptionError names ``key``."""
        if self.kind is bool:
            return parse_bool(key, value)
        try:
            if isinstance(value, bool):
                raise ValueError
            number = self.kind(value)
            if self.kind is int and isinstance(value, float) and value != number:
                raise ValueError
        except (TypeError, ValueError):
            raise OptionError(f"{key} {shown(value)}: expected {self.range_text}") from None
        return self.check(key, number, value)

    def check(self, key: str, number: float | int, given: object = None) -> float | int:
        """``number`` if it lies in the range (NaN and infinities never do); errors show the value as ``given``."""
        inside = math.isfinite(number)
        if inside and self.low is not None:
            inside = number > self.low if self.low_open else number >= self.low
        if inside and self.high is not None:
            inside = number < self.high if self.high_open else number <= self.high
        if not inside:
            raise OptionError(f"{key} {shown(number if given is None else given)}: expected {self.range_text}")
        return number


def shown(value: object) -> str:
    """A value as the user typed it: text as is (a CLI flag or a TOML string), anything else as Python shows it."""
    return value if isinstance(value, str) else repr(value)


def parse_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise OptionError(f"{key} {shown(value)}: expected true or false")
