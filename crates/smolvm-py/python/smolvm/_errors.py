"""Calls into the native module with its errors mapped onto smolvm.exceptions."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

from . import _native
from .exceptions import _from_native

T = TypeVar("T")


def native(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _native.NativeError as e:
            raise _from_native(e) from None

    return wrapper


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    return native(fn)(*args, **kwargs)
