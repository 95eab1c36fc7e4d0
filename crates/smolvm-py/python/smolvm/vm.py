"""The SmolVM sandbox handle."""

from __future__ import annotations

import atexit
import json
import os
import threading
from os import getpid as _getpid  # (`os` is also a parameter's name below)
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import _args, _native
from ._errors import call
from .config import VMConfig, _mounts, _port_forwards
from .exceptions import CommandBlockedError, SmolVMError, ValidationError, VMNotFoundError
from .types import CommandResult, SnapshotInfo, VMInfo, VMState

_SHELLS = ("login", "raw")
#: The most bytes of stdout, and of stderr, ``run`` keeps unless told otherwise (64 MiB).
MAX_OUTPUT: int = _native.MAX_OUTPUT

# A snapshot given up by Ctrl-C finishes removing its files before the interpreter ends.
atexit.register(_native.wait_for_given_up)


class _NotGiven:
    """A keyword's default that reads as ``False`` but is told apart from an explicit
    ``False``: an explicit one overrides the config's field, the default leaves it."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "False"


_FALSE = _NotGiven()


def _port_list(value: Any) -> list:
    # (A str is a sequence too: "80" would be the ports '8' and '0'.)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValidationError(f"invalid port_forwards: expected a list, got {type(value).__name__}", {"field": "port_forwards"})
    return list(value)


class SmolVM:
    """A sandbox: a microVM with its own kernel.

    ``with SmolVM(...) as vm:`` starts it on enter and, if this object created it, stops and
    deletes it on exit (also when the block raises).
    """

    def __init__(
        self,
        config: Optional[VMConfig] = None,
        *,
        vm_id: Optional[str] = None,
        backend: Optional[str] = None,
        memory: Optional[int] = None,
        disk_size: Optional[int] = None,
        env_vars: Optional[Mapping[str, str]] = None,
        mounts: Optional[Sequence[Any]] = None,
        writable_mounts: bool = _FALSE,  # type: ignore[assignment]
        internet_settings: Optional[Any] = None,
        comm_channel: Optional[str] = None,
        os: Optional[str] = None,
        image: Optional[str] = None,
        ssh_user: Optional[str] = None,
        ssh_password: Optional[str] = None,
        vcpu_count: Optional[int] = None,
        network: Optional[str] = None,
        port_forwards: Optional[Sequence[Any]] = None,
    ) -> None:
        # The guest OS first: a Windows guest's other settings (password logins) follow from it.
        if os == "windows":
            raise ValidationError("invalid os: 'windows' guests are not supported by this build yet (allowed: 'linux', 'alpine', 'debian')",
                                  {"field": "os"})
        if os not in (None, "linux", "alpine", "debian"):
            raise ValidationError(f"invalid os: {os!r} (allowed: 'linux', 'alpine', 'debian')", {"field": "os"})
        if ssh_password is not None:
            raise ValidationError("invalid ssh_password: not supported by this build yet", {"field": "ssh_password"})
        if ssh_user not in (None, "root"):
            raise ValidationError(f"invalid ssh_user: {ssh_user!r} (SSH images log in as root with smolvm's key)", {"field": "ssh_user"})
        if config is not None and not isinstance(config, VMConfig):
            raise ValidationError(f"invalid config: expected a VMConfig, got {type(config).__name__}", {"field": "config"})
        config = config or VMConfig()
        if image is None and os in ("alpine", "debian"):
            image = f"{os}-ssh"
        # Keyword arguments override the config's fields of the same meaning.
        overrides = {"image": image, "disk_size_mib": disk_size, "comm_channel": comm_channel, "vm_id": vm_id,
                     "backend": backend, "memory": memory, "vcpu_count": vcpu_count,
                     "internet_settings": internet_settings, "network": network,
                     "port_forwards": None if port_forwards is None else _port_list(port_forwards),
                     "workspace_mounts": mounts,
                     "writable_mounts": None if writable_mounts is _FALSE else _args.flag(writable_mounts, "writable_mounts"),
                     "env_vars": None if env_vars is None else {**config.env_vars, **_args.env_vars(env_vars)}}
        changes: Dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        self._config = config.replace(**changes) if changes else config
        self._native: Optional[Any] = None
        self._owned = True
        self._made_in = _getpid()
        self._tied = False
        self.on_pre_run: Optional[Callable[[str], None]] = None
        self.on_post_run: Optional[Callable[[str, CommandResult], None]] = None
        self.on_run_error: Optional[Callable[[str, BaseException], None]] = None

    # -- identity and state ------------------------------------------------------------------

    @classmethod
    def from_id(cls, vm_id: str) -> "SmolVM":
        """Reconnect to an existing sandbox. Raises VMNotFoundError if there is none."""
        vm = cls.__new__(cls)
        vm._native = call(_native.Vm.open, _args.text(vm_id, "vm_id"))
        vm._config = VMConfig(vm_id=vm_id)
        vm._owned = False
        vm._made_in = _getpid()
        vm._tied = False
        vm.on_pre_run = vm.on_post_run = vm.on_run_error = None
        return vm

    @property
    def vm_id(self) -> Optional[str]:
        """The sandbox's id: the one given, or the one chosen at the first ``start()``
        (``None`` until then if none was given)."""
        return self._native.id if self._native is not None else self._config.vm_id

    @property
    def status(self) -> VMState:
        """The sandbox's state now (a ``VMState``, comparable with its string value); ``CREATED``
        before the first ``start()``."""
        if self._native is None:
            return VMState.CREATED
        return VMState(call(self._native.state))

    @property
    def info(self) -> VMInfo:
        """A ``VMInfo``: id, state, vCPUs, memory (MiB), the managed variables' names and, in
        ``error``, why."""
        if self._native is None:
            # Not started yet: what the config asks for, as `status` says (created).
            c = self._config
            return VMInfo._from_json({"id": c.vm_id or "", "state": VMState.CREATED.value, "vcpu_count": c.vcpu_count,
                                      "memory_mib": c.memory, "env_keys": sorted(c.env_vars)})
        return VMInfo._from_json(json.loads(call(self._native.info)))

    def _require(self) -> Any:
        if self._native is None:
            raise SmolVMError(f"VM '{self.vm_id or '(no id yet)'}' is created; start it first (vm.start())", {"state": "created"})
        return self._native

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, boot_timeout: float = 30) -> "SmolVM":
        """Create the sandbox (the first time) and boot it, waiting at most ``boot_timeout``
        seconds for its agent; the configured variables are in place when it returns. Returns
        ``self``. A running sandbox is left as it is; a paused one is refused (``resume()``)."""
        return self._start(boot_timeout, ephemeral=False)

    def _start(self, boot_timeout: float, ephemeral: bool) -> "SmolVM":
        boot_timeout = _args.seconds(boot_timeout, "boot_timeout")
        made = False
        if self._native is None:
            # One thread makes the sandbox: two starting a new handle at once made two, and the
            # first, its handle overwritten, ran on unreachable. (The lock is the handle's own,
            # and held only while the record is made: other threads see the sandbox, and can
            # stop or delete it, while it boots.)
            with self.__dict__.setdefault("_making", threading.Lock()):
                if self._native is None:
                    self._native = call(_native.Vm.create, self._config._to_json(), ephemeral)
                    made = True
        native = self._native
        try:
            call(native.start, boot_timeout)
        except BaseException:
            if made:
                # Made by this call and never started: a failed start leaves no sandbox (nor
                # its name) behind, as `smolvm sandbox create` does. The error says what went
                # wrong.
                try:
                    call(native.delete)
                except Exception:
                    pass
                self._native = None
            raise
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the sandbox: its guest gets ``timeout`` seconds to shut down (0: at once). One
        that was never started has nothing to stop."""
        timeout = _args.seconds(timeout, "timeout", zero=True)
        if self._native is not None:
            call(self._native.stop, timeout)

    def delete(self) -> None:
        """Stop the sandbox if it runs and remove it and all its files (its snapshots stay)."""
        if self._native is not None:
            call(self._native.delete)

    def close(self) -> None:
        """Drop the connection; the sandbox keeps running (see ``from_id``).

        Inside the ``with`` block that made the sandbox this does nothing: the sandbox lives as
        long as that connection (so that it goes with a killed process), and the block's end
        deletes it."""
        if self._native is not None and not self._tied:
            call(self._native.close)

    def pause(self) -> None:
        """Freeze the VM's CPUs; its processes keep their state."""
        call(self._require().pause)

    def resume(self) -> None:
        """Let a paused VM run on, from where it was frozen."""
        call(self._require().resume)

    def snapshot(self, snapshot_id: Optional[str] = None, snapshot_type: str = "full") -> SnapshotInfo:
        """Save this sandbox (``full``: memory, devices and disk; ``disk``: the root disk)."""
        snapshot_id = None if snapshot_id is None else _args.text(snapshot_id, "snapshot_id")
        return SnapshotInfo(*call(self._require().snapshot, snapshot_id, _args.text(snapshot_type, "snapshot_type")))

    @staticmethod
    def list_snapshots() -> List[SnapshotInfo]:
        """Every saved snapshot, oldest first (they outlive the sandboxes they were taken of)."""
        return [
            SnapshotInfo(s["id"], s["vm_id"], s["kind"], s["path"]) for s in json.loads(call(_native.list_snapshots))
        ]

    @staticmethod
    def delete_snapshot(snapshot_id: str) -> None:
        """Delete a snapshot; refused while a sandbox restored from it stands on its disk."""
        call(_native.delete_snapshot, _args.text(snapshot_id, "snapshot_id"))

    @classmethod
    def from_snapshot(
        cls,
        snapshot_id: str,
        backend: Optional[str] = None,
        resume: Optional[bool] = None,
        *,
        resume_vm: Optional[bool] = None,
        vm_id: Optional[str] = None,
        env_vars: Optional[Mapping[str, str]] = None,
        boot_timeout: float = 30,
        mounts: Any = None,
        writable_mounts: Optional[bool] = None,
        port_forwards: Optional[list] = None,
    ) -> "SmolVM":
        """Start a new sandbox from a snapshot; it is this object's to delete.

        ``mounts`` (as ``SmolVM(mounts=...)`` takes them; ``[]`` for none) replace the
        snapshot's: a 'disk' snapshot's host directories may be gone since. ``None`` keeps them.
        New mounts are read-only unless ``writable_mounts=True``; the snapshot's own keep their
        setting unless it is given. ``port_forwards`` (as ``VMConfig`` takes them; ``[]`` for
        none) replace the snapshot's, whose fixed host ports its running source still holds."""
        if backend not in (None, "qemu", "auto"):
            raise ValidationError(f"invalid backend: {backend!r} cannot restore this snapshot (allowed: 'qemu', 'auto')", {"field": "backend"})
        given = [(name, _args.flag(value, name)) for name, value in (("resume", resume), ("resume_vm", resume_vm)) if value is not None]
        if len(given) == 2 and given[0][1] != given[1][1]:
            # Two names for one setting, at odds: neither may silently win.
            raise ValidationError(
                f"invalid resume_vm: {resume_vm!r} contradicts resume={resume!r} (give one of them)", {"field": "resume_vm"}
            )
        resume = given[-1][1] if given else True
        snapshot_id = _args.text(snapshot_id, "snapshot_id")
        vm_id = None if vm_id is None else _args.text(vm_id, "vm_id")
        vm = cls.__new__(cls)
        env = _args.env_vars(env_vars) if env_vars is not None else None
        boot_timeout = _args.seconds(boot_timeout, "boot_timeout")
        if writable_mounts is not None:
            _args.flag(writable_mounts, "writable_mounts")
        hosts = None if mounts is None else [(m["host"], m["guest"]) for m in _mounts(mounts)]
        ports = None if port_forwards is None else [(p["guest"], p["host"]) for p in _port_forwards(port_forwards)]
        vm._native = call(_native.Vm.from_snapshot, snapshot_id, vm_id, env, resume, boot_timeout, hosts, writable_mounts, ports)
        vm._config = VMConfig(vm_id=vm._native.id)
        vm._owned = True
        vm._made_in = _getpid()
        vm._tied = False
        vm.on_pre_run = vm.on_post_run = vm.on_run_error = None
        return vm

    def __enter__(self) -> "SmolVM":
        # A sandbox made for a `with` block belongs to this process: if the process dies
        # without reaching __exit__ (SIGKILL), the sandbox goes with it.
        if self._native is None:
            try:
                self._start(30, ephemeral=True)
                self._tied = True
            except BaseException:
                # __exit__ will not run: a failed or interrupted boot must not leave its
                # sandbox (or its name) behind.
                if self._native is not None:
                    try:
                        self.delete()
                    except Exception:
                        pass
                raise
        elif self.status not in (VMState.RUNNING, VMState.PAUSED):
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            # A forked child that leaves the block (sys.exit unwinds through it) leaves the
            # sandbox to the process whose block it is: it deleted the parent's sandbox.
            if self._owned and _getpid() == self._made_in:
                try:
                    self.delete()
                except VMNotFoundError:
                    # Gone already (its guest powered off, or someone deleted it): what the
                    # block's end was to do is done.
                    pass
            else:
                self.close()
        except Exception as cleanup:
            if exc is None:
                raise
            # The block's own exception is the one to see; the failed clean-up goes with it
            # (as a note from Python 3.11, as a warning before).
            note = f"and cleaning up the sandbox failed too: {cleanup}"
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            else:
                import warnings

                warnings.warn(note, RuntimeWarning, stacklevel=2)

    # -- commands ----------------------------------------------------------------------------

    def run(
        self,
        command: str,
        timeout: float = 30,
        shell: str = "login",
        stdin: Optional[Union[bytes, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        max_output: int = MAX_OUTPUT,
        cwd: Optional[str] = None,
    ) -> CommandResult:
        """Run ``command`` in a fresh process: ``$SHELL -lc`` (login) or ``/bin/sh -c`` (raw).

        ``stdin`` (bytes, or text sent as UTF-8) is what the command reads on its standard input;
        without it the command reads nothing. ``env`` is variables of this command alone, on top
        of the sandbox's managed ones (which a login shell reads); they are never written to the
        guest's files. ``cwd`` is the command's working directory in the guest (absolute;
        default: the home directory). ``max_output`` is the most bytes of stdout, and of
        stderr, the result keeps (64 MiB): a command that prints more is stopped and
        ``SmolVMError`` says so, so that a runaway command cannot fill this process's memory.
        """
        _args.text(command, "command")
        if not command.strip():
            raise ValidationError("invalid command: must not be empty", {"field": "command"})
        if timeout is None or _args.seconds(timeout, "timeout") < 1:
            raise ValidationError("invalid timeout: must be at least 1 second", {"field": "timeout"})
        if shell not in _SHELLS:
            raise ValidationError(f"invalid shell: {shell!r} (allowed: 'login', 'raw')", {"field": "shell"})
        if isinstance(stdin, str):
            stdin = _args.text(stdin, "stdin").encode()
        elif stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise ValidationError("invalid stdin: must be bytes or str", {"field": "stdin"})
        command_env = None if env is None else _args.env_vars(env, "env")
        max_output = _args.count(max_output, "max_output", "bytes")
        cwd = None if cwd is None else _args.text(cwd, "cwd")
        if self.on_pre_run is not None:
            self.on_pre_run(command)  # may raise CommandBlockedError to veto
        try:
            code, out, err = call(
                self._require().run,
                command,
                float(timeout),
                shell,
                None if stdin is None else bytes(stdin),
                command_env,
                max_output,
                cwd,
            )
        except BaseException as e:
            if self.on_run_error is not None and not isinstance(e, CommandBlockedError):
                self.on_run_error(command, e)
            raise
        result = CommandResult(code, out, err)
        if self.on_post_run is not None:
            self.on_post_run(command, result)
        return result

    def can_run_commands(self) -> bool:
        """Whether ``run`` can work now: the sandbox runs and its agent answers (with
        ``comm_channel="ssh"``: its SSH server was set up and its host key pinned; no login is
        tried, ``wait_for_ready`` does that)."""
        return self._native is not None and call(self._native.can_run_commands)

    def wait_for_ready(self, timeout: float = 60) -> None:
        """Wait until the agent answers; a sandbox that is not running says so at once."""
        call(self._require().wait_for_ready, _args.seconds(timeout, "timeout"))

    def wait_for_ssh(self, timeout: float = 60) -> None:
        """Wait until an SSH login works (images with an SSH server: ``image="debian-ssh"``,
        ``"alpine-ssh"``); the sandbox's host key is pinned, never trusted on first sight."""
        call(self._require().wait_for_ssh, _args.seconds(timeout, "timeout"))

    # -- ports ---------------------------------------------------------------------------------

    def expose_local(self, guest_port: int, host_port: Optional[int] = None) -> int:
        """Make the guest's port reachable on 127.0.0.1; returns the host port."""
        host_port = None if host_port is None else _args.port(host_port, "host_port")
        return call(self._require().expose_local, _args.port(guest_port, "guest_port"), host_port)

    def unexpose_local(self, guest_port: int) -> None:
        """Close the host port that ``expose_local`` opened for ``guest_port``."""
        call(self._require().unexpose_local, _args.port(guest_port, "guest_port"))

    def wait_for_ports(self, ports: Union[int, Sequence[int]], timeout: float = 30) -> None:
        """Wait until something in the guest listens on each port (TCP): a server started in
        the background is then ready. Raises OperationTimeoutError past ``timeout``."""
        wanted = [ports] if isinstance(ports, int) else list(ports) if isinstance(ports, (list, tuple, set, frozenset)) else []
        # (bool is an int in Python; True is no port.)
        bad = next((p for p in wanted if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536), None)
        if not wanted or bad is not None:
            what = repr(ports if not wanted else bad)
            raise ValidationError(f"invalid ports: {what[:80]} (give at least one port, each 1..=65535)", {"field": "ports"})
        call(self._require().wait_for_ports, sorted(set(wanted)), _args.seconds(timeout, "timeout"))

    # -- files ---------------------------------------------------------------------------------

    def upload_file(self, local_path: "os.PathLike[str] | str", guest_path: str) -> None:
        """Copy a host file or directory into the guest. ``guest_path`` must be absolute; a
        trailing ``/`` means into that directory under the same name; parents are created."""
        call(self._require().upload, _args.path(local_path, "local_path"), _args.path(guest_path, "guest_path"))

    def download_file(self, guest_path: str, local_path: "os.PathLike[str] | str") -> None:
        """Copy a guest file or directory to the host (setuid/setgid/sticky bits dropped)."""
        call(self._require().download, _args.path(guest_path, "guest_path"), _args.path(local_path, "local_path"))

    # -- environment variables ---------------------------------------------------------------

    def set_env_vars(self, env_vars: Mapping[str, str], *, merge: bool = True) -> List[str]:
        """Set variables for new login shells; returns the sorted names present after. On a
        sandbox that is not running they are kept for its next start."""
        env_vars, merge = _args.env_vars(env_vars), _args.flag(merge, "merge")
        if self._native is None:
            # Not made yet: they become part of the config it will be made with.
            self._config = self._config.replace(env_vars={**(self._config.env_vars if merge else {}), **env_vars})
            return sorted(self._config.env_vars)
        return call(self._native.set_env_vars, env_vars, merge)

    def unset_env_vars(self, keys: Union[str, Sequence[str]]) -> Dict[str, str]:
        """Remove variables (a name, or a list of them); returns the removed ones with their
        previous values."""
        keys = _args.names(keys, "keys")
        if self._native is None:
            for k in keys:
                try:
                    call(_native.validate_env_key, k)
                except ValidationError as e:
                    e.details["field"] = "keys"  # the parameter it came in, as when running
                    raise
            kept = dict(self._config.env_vars)
            removed = {k: kept.pop(k) for k in keys if k in kept}
            self._config = self._config.replace(env_vars=kept)
            return removed
        return call(self._native.unset_env_vars, keys)

    def list_env_vars(self) -> Dict[str, str]:
        """The variables smolvm manages in this sandbox."""
        if self._native is None:
            return dict(self._config.env_vars)
        return call(self._native.list_env_vars)

    def __repr__(self) -> str:
        return f"SmolVM(vm_id={self.vm_id!r})"
