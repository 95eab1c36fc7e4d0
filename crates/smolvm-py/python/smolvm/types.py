"""Value types: sandbox states, command results, sandbox info."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional


class VMState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """stdout without surrounding whitespace."""
        return self.stdout.strip()


@dataclass(frozen=True)
class VMInfo:
    vm_id: str
    status: VMState
    vcpu_count: int
    memory: int
    env_keys: list = field(default_factory=list)
    error: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> "VMInfo":
        return cls(
            vm_id=d["id"],
            status=VMState(d["state"]),
            vcpu_count=d["vcpu_count"],
            memory=d["memory_mib"],
            env_keys=list(d.get("env_keys", [])),
            error=d.get("error"),
            raw=d,
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A saved sandbox: ``full`` (memory, devices, disk) or ``disk``."""

    snapshot_id: str
    vm_id: str
    snapshot_type: str
    path: str = ""


__all__ = ["VMState", "CommandResult", "VMInfo", "SnapshotInfo"]
