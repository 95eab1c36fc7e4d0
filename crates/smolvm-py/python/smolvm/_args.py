"""Arguments checked before they reach the native module, which would otherwise refuse a wrong
type with TypeError or OverflowError: bad input is a ValidationError that names the field and
what is allowed. No check ever shows an environment value."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping

from . import _native
from ._errors import call
from .exceptions import ValidationError

# As the library's own bound (smolvm::config::MAX_WAIT): longer waits can only mean "never".
_MAX_WAIT = 365 * 86_400


def _bad(field: str, message: str) -> ValidationError:
    return ValidationError(f"invalid {field}: {message}", {"field": field})


def seconds(value: Any, field: str, *, zero: bool = False) -> float:
    """A wait in seconds: a number (not a bool), finite, positive (or zero where ``zero``), and
    at most a year."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, f"{type(value).__name__} is not a number of seconds")
    try:
        v = float(value)
    except OverflowError:  # an int past a float's range: as far out as infinity
        v = math.inf if value > 0 else -math.inf
    # (Infinity is positive: past the bound below, as in the Rust library.)
    if math.isnan(v) or v < 0 or (v == 0 and not zero):
        raise _bad(field, "must be 0 or a positive number of seconds" if zero else "must be a positive number of seconds")
    if v > _MAX_WAIT:
        raise _bad(field, f"must be at most {_MAX_WAIT} seconds (a year)")
    return v


def port(value: Any, field: str) -> int:
    """A TCP port, 1..65535 (a bool is no port)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _bad(field, f"{value!r} is not a port (allowed: 1..=65535)")
    return value


def text(value: Any, field: str) -> str:
    """A string that UTF-8 can carry (a lone surrogate cannot)."""
    if not isinstance(value, str):
        raise _bad(field, f"expected a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(field, "is not valid text (it cannot be encoded as UTF-8)") from None
    return value


def count(value: Any, field: str, unit: str) -> int:
    """A whole positive number (not a bool) that the library's 32 bits can carry."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise _bad(field, f"{value!r} is not a positive whole number of {unit}")
    return value


def whole(value: Any, field: str) -> int:
    """A whole number in the field's range (the library's check, which also takes the ints
    that 32 bits cannot carry)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"{value!r} is not a whole number")
    try:
        shown = str(value)
    except ValueError:  # more digits than Python writes out (sys.get_int_max_str_digits)
        raise _bad(field, "a number of thousands of digits is out of range") from None
    call(_native.check_whole, field, shown)
    return value


def flag(value: Any, field: str) -> bool:
    """A bool (not a number or a str that reads as one)."""
    if not isinstance(value, bool):
        raise _bad(field, f"{value!r} is not a bool")
    return value


def names(value: Any, field: str) -> list:
    """A name, or an iterable of names (a str alone is one name, not its letters)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise _bad(field, f"expected a name or a list of names, got {type(value).__name__}")
    return [text(v, field) for v in value]


def path(value: Any, field: str) -> str:
    """A path: a str or an os.PathLike."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return text(value, field)


def env_vars(value: Any, field: str = "env_vars") -> Dict[str, str]:
    """Names to values, both text. The message names a variable, never shows its value."""
    if not isinstance(value, Mapping):
        raise _bad(field, f"expected a mapping of names to values, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        text(k, field)
        # The name first: the messages below show it, and one that is no name may be a secret
        # put there by mistake (the native check shows no such key).
        try:
            call(_native.validate_env_key, k)
        except ValidationError as e:
            e.details["field"] = field
            raise
        if not isinstance(v, str):
            raise _bad(field, f"the value of {k} is not a str (it is {type(v).__name__})")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(field, f"the value of {k} is not valid text (it cannot be encoded as UTF-8)") from None
        out[k] = v
    return out
