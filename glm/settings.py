"""Environment settings, parsed in one place.

Every number an operator sets (GLM_DRAIN_SECONDS, GLM_KV_BUDGET_TOKENS, ...) goes through `integer`
or `number`, flags through `flag` and word choices through `choice`: an unset or empty variable
takes the default, anything else must parse and lie within its bounds. inf and nan are never
accepted (an infinite drain or timeout is the unbounded wait the setting exists to prevent; nan
compares false with everything), and a bad value fails setup with a SettingError naming the
variable, the value and what it must be.
"""
from __future__ import annotations

import math
import os

from .errors import GLMError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingError(GLMError, ValueError):
    """An environment setting the service cannot use; the message names the variable."""


def raw(name: str) -> str:
    """The variable's value, stripped; "" when unset."""
    return os.environ.get(name, "").strip()


def _bad(name: str, value: str, rule: str) -> SettingError:
    return SettingError(f"{name}={value!r} must be {rule}")


def _bounds(low: str, at_most) -> str:
    return low + ("" if at_most is None else f" and <= {at_most:g}")


def integer(name: str, default: int | None, *, at_least: int = 0, at_most: int | None = None) -> int | None:
    """A whole number in [at_least, at_most]; `default` when unset."""
    value = raw(name)
    if not value:
        return default
    rule = _bounds(f"an integer >= {at_least}", at_most)
    try:
        n = int(value)
    except ValueError:
        raise _bad(name, value, rule) from None
    if n < at_least or (at_most is not None and n > at_most):
        raise _bad(name, value, rule)
    return n


def number(name: str, default: float | None, *, at_least: float = 0.0, at_most: float | None = None,
           above: bool = False) -> float | None:
    """A finite number >= at_least (> at_least when `above`) and <= at_most; `default` when unset."""
    value = raw(name)
    if not value:
        return default
    rule = _bounds(f"a finite number {'>' if above else '>='} {at_least:g}", at_most)
    try:
        x = float(value)
    except ValueError:
        raise _bad(name, value, rule) from None
    if not math.isfinite(x) or x < at_least or (above and x == at_least) or (at_most is not None and x > at_most):
        raise _bad(name, value, rule)
    return x


def flag(name: str, default: bool = False) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); `default` when unset."""
    value = raw(name)
    if not value:
        return default
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise _bad(name, value, f"one of {'/'.join(TRUE)} or {'/'.join(FALSE)}")


def choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (any case); `default` when unset."""
    value = raw(name)
    if not value:
        return default
    if value.lower() not in choices:
        raise _bad(name, value, "one of " + ", ".join(choices))
    return value.lower()
