"""VMConfig: what a sandbox is made of. Frozen; unknown fields are rejected."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _native
from ._errors import call
from .exceptions import ValidationError

# Fields users know from the documentation that this build cannot honour yet: refusing a
# value is better than silently ignoring it.
_NOT_YET = ("disk_size_mib", "port_forwards", "internet_settings", "workspace_mounts", "ssh_public_key")


@dataclass(frozen=True)
class VMConfig:
    vm_id: Optional[str] = None
    vcpu_count: int = 2
    memory: int = 512
    kernel_path: Optional[str] = None
    initrd_path: Optional[str] = None
    rootfs_path: Optional[str] = None
    boot_args: Optional[str] = None
    env_vars: dict = field(default_factory=dict)
    backend: Optional[str] = None
    disk_size_mib: Optional[int] = None
    port_forwards: Optional[list] = None
    internet_settings: Optional[Any] = None
    workspace_mounts: Optional[list] = None
    ssh_public_key: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("kernel_path", "initrd_path", "rootfs_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, os.fspath(value))
        object.__setattr__(self, "env_vars", dict(self.env_vars or {}))
        for name in _NOT_YET:
            if getattr(self, name):
                raise ValidationError(f"invalid {name}: not supported by this build yet", {"field": name})
        call(_native.validate_config, self._to_json())

    def _to_json(self) -> str:
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _NOT_YET
        }
        return json.dumps(d)

    def replace(self, **changes: Any) -> "VMConfig":
        return VMConfig(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes})


_FIELDS = frozenset(f.name for f in dataclasses.fields(VMConfig))
_dataclass_init = VMConfig.__init__


def _init(self, *args: Any, **kwargs: Any) -> None:
    unknown = sorted(set(kwargs) - _FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown VMConfig field(s): {', '.join(unknown)} (allowed: {', '.join(sorted(_FIELDS))})",
            {"field": unknown[0]},
        )
    _dataclass_init(self, *args, **kwargs)


VMConfig.__init__ = _init  # type: ignore[method-assign]

__all__ = ["VMConfig"]
