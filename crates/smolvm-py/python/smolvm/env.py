"""Environment variable helpers."""

from __future__ import annotations

from . import _args, _native
from ._errors import call


def validate_env_key(key: str) -> None:
    """Raise ``ValueError`` (a :class:`~smolvm.exceptions.ValidationError`) unless ``key``
    matches ``[A-Za-z_][A-Za-z0-9_]*``."""
    call(_native.validate_env_key, _args.text(key, "key"))


__all__ = ["validate_env_key"]
