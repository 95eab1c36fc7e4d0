"""VMConfig: what a sandbox is made of. Frozen; unknown fields are rejected."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _args, _native
from ._errors import call
from .exceptions import ValidationError


@dataclass(frozen=True)
class InternetSettings:
    """What a sandbox may reach: ``open`` (default), ``off``, or ``restricted`` to the given
    domains (and their subdomains) and IPv4 networks."""

    mode: str = "open"
    allowed_domains: tuple = ()
    allowed_cidrs: tuple = ()


def _internet(value: Any) -> Optional[dict]:
    if value is None:
        return None
    if isinstance(value, InternetSettings):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ValidationError("invalid internet_settings: expected InternetSettings or a dict", {"field": "internet_settings"})
    unknown = sorted(set(value) - {"mode", "allowed_domains", "allowed_cidrs"})
    if unknown:
        raise ValidationError(f"invalid internet_settings: unknown key(s) {', '.join(map(repr, unknown))} "
                              "(allowed: 'mode', 'allowed_domains', 'allowed_cidrs')", {"field": "internet_settings"})

    def names(key: str) -> list:
        # (A str is a sequence too: of its letters, which are not what was meant.)
        v = value.get(key, ())
        if isinstance(v, str) or not isinstance(v, (list, tuple, set, frozenset)):
            raise ValidationError(f"invalid internet_settings: {key} must be a list of str, not {type(v).__name__}",
                                  {"field": "internet_settings"})
        return [_args.text(x, f"internet_settings.{key}") for x in v]

    return {"mode": _args.text(value.get("mode", "open"), "internet_settings.mode"),
            "allowed_domains": names("allowed_domains"), "allowed_cidrs": names("allowed_cidrs")}


def _mount(m: Any) -> dict:
    """``"HOST[:GUEST]"``, a path object (the host directory), ``(host, guest)`` or
    ``{"host": h, "guest": g}``; a relative host path is taken from the current directory, and
    the guest path defaults to ``/workspace/<the directory's name>``."""
    if isinstance(m, os.PathLike):
        m = {"host": os.fspath(m), "guest": None}
    given = m
    if isinstance(m, str):
        # A guest path is absolute: the split is at the last ":/", so host paths may hold colons.
        cut = m.rfind(":/")
        m = {"host": m[:cut], "guest": m[cut + 1:]} if cut >= 0 else {"host": m, "guest": None}
    elif isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], (str, os.PathLike)):
        m = {"host": os.fspath(m[0]), "guest": m[1]}
    if (not isinstance(m, dict) or not m.get("host") or set(m) - {"host", "guest"}
            or not isinstance(m["host"], (str, os.PathLike)) or not isinstance(m.get("guest"), (str, type(None)))):
        raise ValidationError(f"invalid mounts: {given!r} (use 'HOST[:GUEST]', a path, (host, guest) or {{'host': h, 'guest': g}})",
                              {"field": "mounts"})
    # Links resolved, as the CLI does: the default guest path is the real directory's name.
    return {"host": os.path.realpath(os.fspath(m["host"])), "guest": m.get("guest")}


def _mounts(value: Any) -> list:
    """One mount or a list of them, each as ``_mount`` takes it."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"invalid mounts: {value!r} (use a mount or a list of them)", {"field": "mounts"})
    return [_mount(m) for m in value]


def _port_forward(p: Any) -> dict:
    """A guest port, ``(host, guest)``, or ``{"guest": g, "host": h}``."""
    port = _args.port
    if isinstance(p, int) and not isinstance(p, bool):
        return {"guest": port(p, "port_forwards"), "host": None}
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return {"guest": port(p[1], "port_forwards"), "host": port(p[0], "port_forwards")}
    if isinstance(p, dict) and "guest" in p and set(p) <= {"guest", "host"}:
        host = p.get("host")
        return {"guest": port(p["guest"], "port_forwards"), "host": None if host is None else port(host, "port_forwards")}
    raise ValidationError(f"invalid port_forwards: {p!r} (use a guest port, (host, guest) or {{'guest': g, 'host': h}})",
                          {"field": "port_forwards"})


def _port_forwards(value: Any) -> list:
    """A list of what ``_port_forward`` takes."""
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"invalid port_forwards: expected a list, got {type(value).__name__}", {"field": "port_forwards"})
    return [_port_forward(p) for p in value]


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
    network: Optional[str] = None
    disk_size_mib: Optional[int] = None
    port_forwards: Optional[list] = None
    internet_settings: Optional[Any] = None
    workspace_mounts: Optional[list] = None
    writable_mounts: bool = False
    ssh_public_key: Optional[str] = None
    image: Optional[str] = None
    comm_channel: Optional[str] = None

    def __post_init__(self) -> None:
        # (Said as for every other field, not in the native layer's decoder's words.)
        for name in ("vm_id", "boot_args", "backend", "network", "ssh_public_key", "image", "comm_channel"):
            value = getattr(self, name)
            if value is not None:
                _args.text(value, name)
        for name in ("kernel_path", "initrd_path", "rootfs_path"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _args.path(value, name))
        object.__setattr__(self, "env_vars", _args.env_vars(self.env_vars or {}))
        for name in ("vcpu_count", "memory", "disk_size_mib"):
            value = getattr(self, name)
            if not (name == "disk_size_mib" and value is None):  # (a disk's size may be unset)
                _args.whole(value, name)
        _args.flag(self.writable_mounts, "writable_mounts")
        # Resolved now: a relative path means the directory current when the config was made.
        if self.workspace_mounts is not None:
            object.__setattr__(self, "workspace_mounts", _mounts(self.workspace_mounts))
        call(_native.validate_config, self._to_json())

    def __repr__(self) -> str:
        # Env values are secrets: a repr ends up in tracebacks, test output and logs.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["env_vars"] = {k: "****" for k in self.env_vars}
        return "VMConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def _to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["internet_settings"] = _internet(self.internet_settings)
        d["port_forwards"] = _port_forwards(self.port_forwards or [])
        d["workspace_mounts"] = self.workspace_mounts or []
        d["writable_mounts"] = bool(self.writable_mounts)
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

__all__ = ["VMConfig", "InternetSettings"]
