"""Exceptions raised by smolvm. All derive from :class:`SmolVMError`."""

from __future__ import annotations

import json
from typing import Any, Optional


class SmolVMError(Exception):
    """Base class: ``message`` says what went wrong, ``details`` carries structured context."""

    def __init__(self, message: str, details: Optional[dict] = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        # Pickled by state, not by re-running ``__init__`` with ``args`` (which holds only the
        # message, and subclasses take other arguments): an error raised in a worker process
        # (multiprocessing, ProcessPoolExecutor) reaches the parent whole.
        return (_restore, (type(self), self.args), self.__dict__)


def _restore(cls: type, args: tuple) -> "SmolVMError":
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    return err


class ValidationError(SmolVMError, ValueError):
    """Bad input; the message names the field and what is allowed. Also a ``ValueError``."""


class VMAlreadyExistsError(SmolVMError):
    pass


class VMNotFoundError(SmolVMError):
    pass


class SnapshotNotFoundError(SmolVMError):
    pass


class NetworkError(SmolVMError):
    pass


class HostError(SmolVMError):
    pass


class ImageError(SmolVMError):
    pass


class OperationTimeoutError(SmolVMError):
    """``Operation 'x' timed out after Ns``."""

    def __init__(self, operation: str, timeout_seconds: float, details: Optional[dict] = None) -> None:
        seconds = int(timeout_seconds) if float(timeout_seconds).is_integer() else timeout_seconds
        super().__init__(f"Operation '{operation}' timed out after {seconds}s", details)
        self.operation = operation
        self.timeout_seconds = timeout_seconds


class CommandExecutionUnavailableError(SmolVMError):
    pass


class CommandBlockedError(SmolVMError):
    """Raise it from an ``on_pre_run`` callback to veto a command."""

    def __init__(self, message: str = "the command was blocked by on_pre_run", details: Optional[dict] = None) -> None:
        super().__init__(message, details)


_BY_CODE = {
    "validation": ValidationError,
    "not_found": VMNotFoundError,
    "snapshot_not_found": SnapshotNotFoundError,
    "already_exists": VMAlreadyExistsError,
    "image": ImageError,
    "host": HostError,
    "network": NetworkError,
    "command_unavailable": CommandExecutionUnavailableError,
    "ssh": CommandExecutionUnavailableError,
}


def _from_native(err: BaseException) -> SmolVMError:
    """Map the native layer's ``NativeError(code, message, details_json)``."""
    code, message, details_json = err.args
    details: dict[str, Any] = json.loads(details_json or "{}")
    if code == "timeout":
        return OperationTimeoutError(details.get("operation", "?"), details.get("timeout_seconds", 0), details)
    return _BY_CODE.get(code, SmolVMError)(message, details)


__all__ = [
    "SmolVMError",
    "ValidationError",
    "VMAlreadyExistsError",
    "VMNotFoundError",
    "SnapshotNotFoundError",
    "NetworkError",
    "HostError",
    "ImageError",
    "OperationTimeoutError",
    "CommandExecutionUnavailableError",
    "CommandBlockedError",
]
