"""The documented Python API beyond the seed page: errors, lifecycle, cleanup."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import smolvm
import smolvm.build
import smolvm.env
from smolvm import SmolVM, VMConfig, VMState
from smolvm.exceptions import (
    CommandBlockedError,
    OperationTimeoutError,
    SmolVMError,
    ValidationError,
    VMNotFoundError,
)

from conftest import qemu_processes


def test_module_paths_users_import():
    import smolvm.build
    import smolvm.env
    import smolvm.exceptions
    import smolvm.types

    assert smolvm.types.VMState.RUNNING == "running"
    assert issubclass(smolvm.exceptions.ValidationError, SmolVMError)
    for name in smolvm.exceptions.__all__:
        assert issubclass(getattr(smolvm.exceptions, name), SmolVMError)
    assert isinstance(smolvm.build.SSH_BOOT_ARGS, str)
    # Safe on every machine: q35's devices sit on PCI.
    assert "pci=off" not in smolvm.build.SSH_BOOT_ARGS.split()
    # An explicit keyword overrides the config's field; the default leaves it.
    writable = VMConfig(workspace_mounts=["/tmp"], writable_mounts=True)
    assert SmolVM(writable, writable_mounts=False)._config.writable_mounts is False
    assert SmolVM(writable)._config.writable_mounts is True
    assert SmolVM(mounts=["/tmp"], writable_mounts=True)._config.writable_mounts is True
    import inspect
    assert inspect.signature(SmolVM).parameters["writable_mounts"].default.__repr__() == "False"
    # Each native error code maps to its documented class.
    from smolvm.exceptions import _from_native
    assert isinstance(_from_native(Exception("network", "network: nft: failed", "{}")), smolvm.exceptions.NetworkError)
    assert type(_from_native(Exception("host", "host: x", "{}"))) is smolvm.exceptions.HostError


def test_vmconfig_is_frozen_validated_and_rejects_unknown_fields():
    c = VMConfig()
    assert (c.vcpu_count, c.memory, c.env_vars) == (2, 512, {})
    # Env values are secrets: a repr (tracebacks, logs) shows the names only.
    shown = repr(VMConfig(env_vars={"API_KEY": "SEKRET"}))
    assert "SEKRET" not in shown and "env_vars={'API_KEY': '****'}" in shown and shown.startswith("VMConfig(vm_id=None")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.memory = 1024
    with pytest.raises(ValidationError, match="memory") as e:
        VMConfig(memory=64)
    assert str(e.value) == "invalid memory: 64 MiB is out of range (allowed 128..=16384 MiB)"
    with pytest.raises(ValidationError, match="vm_id") as e:
        VMConfig(vm_id="Bad_ID!")
    assert str(e.value) == (
        "invalid vm_id: \"Bad_ID!\" is not allowed: use 1-64 characters of a-z, 0-9, '_' and '-', starting and ending with a letter or digit"
    )
    with pytest.raises(ValidationError, match="memroy"):
        VMConfig(memroy=1)
    with pytest.raises(ValidationError, match="kernel_path") as e:
        VMConfig(kernel_path="/nonexistent/vmlinux")
    assert str(e.value) == "invalid kernel_path: /nonexistent/vmlinux is not a readable file"
    with pytest.raises(ValueError, match=r"^Invalid environment variable key: 'MY-VAR'"):
        VMConfig(env_vars={"MY-VAR": "1"})
    with pytest.raises(ValidationError, match="backend"):
        SmolVM(backend="xen")
    # A value of the wrong type or size is named by its field, as a ValidationError.
    for kwargs, message in [
        ({"memory": "512"}, "invalid memory: '512' is not a whole number"),
        ({"memory": None}, "invalid memory: None is not a whole number"),
        ({"memory": 1.5}, "invalid memory: 1.5 is not a whole number"),
        ({"vcpu_count": True}, "invalid vcpu_count: True is not a whole number"),
        ({"memory": 2**32}, "invalid memory: 4294967296 MiB is out of range (allowed 128..=16384 MiB)"),
        ({"memory": 2**70}, "invalid memory: 1180591620717411303424 MiB is out of range (allowed 128..=16384 MiB)"),
        ({"vcpu_count": -(2**200)}, f"invalid vcpu_count: {-(2**200)} is out of range (allowed 1..=32)"),
        ({"disk_size_mib": 2**64, "image": "debian-ssh"}, "invalid disk_size_mib: 18446744073709551616 MiB is out of range (allowed 64..=1048576 MiB)"),
        ({"vm_id": 5}, "invalid vm_id: expected a str, got int"),
        ({"port_forwards": [70000]}, "invalid port_forwards: 70000 is not a port (allowed: 1..=65535)"),
        ({"port_forwards": [("a", "b")]}, "invalid port_forwards: 'b' is not a port (allowed: 1..=65535)"),
        ({"port_forwards": 80}, "invalid port_forwards: expected a list, got int"),
        ({"env_vars": {"A": 5}}, "invalid env_vars: the value of A is not a str (it is int)"),
        ({"env_vars": {"A": "\ud800secret"}}, "invalid env_vars: the value of A is not valid text (it cannot be encoded as UTF-8)"),
    ]:
        with pytest.raises(ValidationError) as e:
            VMConfig(**kwargs)
        assert (str(e.value), e.value.details.get("field")) == (message, next(iter(kwargs))), kwargs
        assert "secret" not in repr(e.value.args)
    # A value put where its name goes, beside a bad value: neither shows.
    for value in (5, "\ud800"):
        with pytest.raises(ValidationError) as e:
            VMConfig(env_vars={"sk/secret+token=": value})
        assert "secret" not in str(e.value) and "secret" not in repr(e.value.args), e.value
    for bad in (5, {"memory": 512}):
        with pytest.raises(ValidationError, match=r"^invalid config: expected a VMConfig"):
            SmolVM(bad)
    # A str where a list belongs is not taken letter by letter; nor is a typo'd key dropped.
    for make, message in [
        (lambda: SmolVM(internet_settings={"mode": "restricted", "allowed_domains": "com"}),
         "invalid internet_settings: allowed_domains must be a list of str, not str"),
        (lambda: SmolVM(internet_settings={"mode": "restricted", "allowed_domain": ["a.com"]}),
         "invalid internet_settings: unknown key(s) 'allowed_domain' (allowed: 'mode', 'allowed_domains', 'allowed_cidrs')"),
        (lambda: SmolVM(port_forwards="80"), "invalid port_forwards: expected a list, got str"),
        (lambda: SmolVM(writable_mounts="no", mounts=["/tmp"]), "invalid writable_mounts: 'no' is not a bool"),
        (lambda: VMConfig(writable_mounts="no"), "invalid writable_mounts: 'no' is not a bool"),
        (lambda: SmolVM.from_id(123), "invalid vm_id: expected a str, got int"),
        (lambda: SmolVM.from_snapshot("s", resume="no"), "invalid resume: 'no' is not a bool"),
        (lambda: SmolVM.from_snapshot("s", resume_vm=1), "invalid resume_vm: 1 is not a bool"),
        (lambda: SmolVM.from_snapshot("s", resume=True, resume_vm=False), "invalid resume_vm: False contradicts resume=True (give one of them)"),
        (lambda: SmolVM(ssh_password=""), "invalid ssh_password: not supported by this build yet"),
        (lambda: VMConfig(kernel_path=5), "invalid kernel_path: expected a str, got int"),
        (lambda: smolvm.env.validate_env_key(5), "invalid key: expected a str, got int"),
        (lambda: smolvm.build.ImageBuilder().build(None), "invalid name: expected a str, got NoneType"),
        (lambda: smolvm.build.ImageBuilder().build_custom(5), "invalid name: expected a str, got int"),
        (lambda: smolvm.build.ImageBuilder().build_custom("t", packages=5), "invalid packages: expected a name or a list of names, got int"),
        (lambda: smolvm.build.ImageBuilder().build_custom("t", files=5), "invalid files: expected a mapping of guest paths to host paths"),
        (lambda: smolvm.build.ImageBuilder().build_custom("t", size_mib=True), "invalid size_mib: True is not a positive whole number of MiB"),
        (lambda: smolvm.build.ImageBuilder().build_custom("t", size_mib=-1), "invalid size_mib: -1 is not a positive whole number of MiB"),
    ]:
        with pytest.raises(ValidationError) as e:
            make()
        assert str(e.value) == message
    # The documentation's Windows example: refused for the OS, not for its password login.
    with pytest.raises(ValidationError, match=r"^invalid os: 'windows' guests are not supported by this build yet"):
        SmolVM(os="windows", image="windows-server", ssh_user="smolvm", ssh_password="smolvm")


def test_run_errors_state_and_timeout(no_leftovers):
    vm = SmolVM(memory=256, vm_id="run-errors")
    with pytest.raises(SmolVMError, match=r"^VM 'run-errors' is created; start it first \(vm.start\(\)\)$"):
        vm.run("true")
    assert vm.status == VMState.CREATED
    info = vm.info
    assert (info.vm_id, info.status, info.vcpu_count, info.memory, info.env_keys) == ("run-errors", VMState.CREATED, 2, 256, [])
    with vm:
        assert vm.status == VMState.RUNNING
        assert vm.info.status == VMState.RUNNING and vm.info.memory == 256
        r = vm.run("echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
        assert vm.run("echo '  padded  '").output == "padded"
        # stdin: bytes as they are, text as UTF-8; without it the command reads nothing.
        assert vm.run("tr a-z A-Z", stdin=b"one\ntwo\n").stdout == "ONE\nTWO\n"
        assert vm.run("wc -c", stdin="héllo").output == "6"
        assert vm.run("wc -c").output == "0"
        with pytest.raises(ValueError, match="invalid stdin: must be bytes or str"):
            vm.run("cat", stdin=42)
        with pytest.raises(ValidationError, match=r"^invalid stdin: is not valid text \(it cannot be encoded as UTF-8\)$"):
            vm.run("cat", stdin="\ud800")
        with pytest.raises(ValueError):
            vm.run("")
        with pytest.raises(ValueError):
            vm.run("true", timeout=0)
        with pytest.raises(ValueError):
            vm.run("true", shell="zsh")
        # Wrong types are ValidationErrors that name the argument, not TypeError or OverflowError.
        for call, message in [
            (lambda: vm.run(b"echo hi"), "invalid command: expected a str, got bytes"),
            (lambda: vm.run("true", timeout="5"), "invalid timeout: str is not a number of seconds"),
            (lambda: vm.run("true", timeout=True), "invalid timeout: bool is not a number of seconds"),
            (lambda: vm.run("true", timeout=float("nan")), "invalid timeout: must be a positive number of seconds"),
            (lambda: vm.run("true", timeout=1e19), "invalid timeout: must be at most 31536000 seconds (a year)"),
            (lambda: vm.run("true", timeout=float("inf")), "invalid timeout: must be at most 31536000 seconds (a year)"),
            (lambda: vm.stop(timeout=-1), "invalid timeout: must be 0 or a positive number of seconds"),
            (lambda: vm.wait_for_ready(timeout=float("nan")), "invalid timeout: must be a positive number of seconds"),
            (lambda: vm.expose_local(70000), "invalid guest_port: 70000 is not a port (allowed: 1..=65535)"),
            (lambda: vm.expose_local(True), "invalid guest_port: True is not a port (allowed: 1..=65535)"),
            (lambda: vm.unexpose_local(-1), "invalid guest_port: -1 is not a port (allowed: 1..=65535)"),
            (lambda: vm.set_env_vars({"A": None}), "invalid env_vars: the value of A is not a str (it is NoneType)"),
            (lambda: vm.set_env_vars({"A": "1"}, merge="yes"), "invalid merge: 'yes' is not a bool"),
            (lambda: vm.unset_env_vars(5), "invalid keys: expected a name or a list of names, got int"),
            (lambda: vm.unset_env_vars(None), "invalid keys: expected a name or a list of names, got NoneType"),
        ]:
            with pytest.raises(ValidationError) as e:
                call()
            assert str(e.value) == message
        # One name is one variable (a str is not taken letter by letter).
        vm.set_env_vars({"APP_MODE": "x", "A": "1", "P": "2"})
        assert vm.unset_env_vars("APP_MODE") == {"APP_MODE": "x"}
        assert vm.list_env_vars() == {"A": "1", "P": "2"}
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError) as e:
            vm.run("sleep 100", timeout=2)
        assert str(e.value) == "Operation 'run' timed out after 2s"
        assert e.value.operation == "run" and e.value.timeout_seconds == 2
        assert time.monotonic() - started < 10
        with pytest.raises(ValueError, match="Environment variable key cannot be empty") as e:
            vm.set_env_vars({"": "x"})
        assert e.value.details.get("field") == "env_vars"
        # Output past max_output (64 MiB unless given) stops the command instead of filling
        # this process's memory.
        assert smolvm.vm.MAX_OUTPUT == 64 << 20
        assert len(vm.run("head -c 4096 /dev/zero | tr '\\0' a", max_output=4096).stdout) == 4096
        with pytest.raises(SmolVMError) as e:
            vm.run("yes", max_output=100_000)
        assert str(e.value) == "the command's stdout passed 100000 bytes, the most `run` keeps; the command was stopped"
        details = e.value.details
        assert (details["code"], details["stream"], details["max_output"]) == ("output_limit", "stdout", 100_000)
        assert "download" in details["recovery"]
        assert vm.run("pgrep -x yes || echo gone").output == "gone"
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValidationError, match=r"^invalid max_output: .* is not a positive whole number of bytes$"):
                vm.run("true", max_output=bad)
        # A working directory of the command's own.
        assert vm.run("pwd", cwd="/tmp").output == "/tmp"
        assert vm.run("pwd").output == "/root"
        with pytest.raises(ValidationError, match=r'^invalid cwd: "tmp" is not an absolute guest path$'):
            vm.run("pwd", cwd="tmp")
        with pytest.raises(SmolVMError, match="working directory /nonexistent does not exist"):
            vm.run("pwd", cwd="/nonexistent")
        vm.wait_for_ready(timeout=30)
        # A command's own variables: for that command, raw shell too, never kept.
        assert vm.run("echo \"$ONE_OFF\"", env={"ONE_OFF": "x 'y' $z"}, shell="raw").output == "x 'y' $z"
        assert vm.run("echo ${ONE_OFF:-unset}").output == "unset"
        assert "ONE_OFF" not in vm.list_env_vars()
        with pytest.raises(ValueError, match="Invalid environment variable key: 'BAD-KEY'") as e:
            vm.run("true", env={"BAD-KEY": "1"})
        # Each names the parameter the bad name came in.
        assert e.value.details.get("field") == "env"
        with pytest.raises(ValueError, match="Invalid environment variable key: 'BAD-KEY'") as e:
            vm.unset_env_vars(["BAD-KEY"])
        assert e.value.details.get("field") == "keys"
        with pytest.raises(ValueError, match="Invalid environment variable key: 'BAD-KEY'") as e:
            smolvm.env.validate_env_key("BAD-KEY")
        assert e.value.details.get("field") == "key"
        vm.stop()
        assert vm.status == VMState.STOPPED
        # The way out is said in Python's terms, not the CLI's.
        with pytest.raises(SmolVMError, match=r"^VM 'run-errors' is stopped; start it first \(vm.start\(\)\)$"):
            vm.run("true")
        # A stopped sandbox cannot become ready by waiting: said at once, not after the timeout.
        started = time.monotonic()
        with pytest.raises(SmolVMError, match="is stopped; start it first"):
            vm.wait_for_ready(timeout=60)
        assert time.monotonic() - started < 10
        with pytest.raises(SmolVMError, match="start it first"):
            SmolVM().wait_for_ready(timeout=60)


def test_errors_cross_processes_and_say_what_was_wrong(no_leftovers):
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    # Pickled whole (a worker of a process pool raises them to its parent).
    e = pickle.loads(pickle.dumps(OperationTimeoutError("run", 5, {"x": 1})))
    assert (type(e), str(e), e.operation, e.timeout_seconds, e.details) == (
        OperationTimeoutError, "Operation 'run' timed out after 5s", "run", 5, {"x": 1})
    e = pickle.loads(pickle.dumps(VMNotFoundError("VM 'x' not found", {"id": "x"})))
    assert (type(e), e.message, e.details) == (VMNotFoundError, "VM 'x' not found", {"id": "x"})
    with ProcessPoolExecutor(1) as pool:
        with pytest.raises(OperationTimeoutError, match=r"^Operation 'run' timed out after 2s$"):
            pool.submit(_raise_timeout).result()
    assert str(CommandBlockedError()) == "the command was blocked by on_pre_run"
    # A wrong type is said as for every field, not in the decoder's words.
    for field in ("vm_id", "boot_args", "ssh_public_key", "comm_channel"):
        with pytest.raises(ValidationError, match=rf"^invalid {field}: expected a str, got int$"):
            VMConfig(**{field: 5})
    # Commands over SSH need a server: the default image has none, refused before it boots.
    with pytest.raises(ValidationError, match=r"^invalid comm_channel: ssh needs an image with an SSH server"):
        SmolVM(comm_channel="ssh").start()


def _raise_timeout():
    raise OperationTimeoutError("run", 2)


def test_from_id_and_deleted_sandboxes(no_leftovers):
    owner = SmolVM(vm_id="pyfromid")
    owner.start()
    other = SmolVM.from_id("pyfromid")
    assert other.run("hostname").output == "pyfromid"
    other.close()
    # A closed handle says so; the sandbox runs on.
    with pytest.raises(ValueError, match="this handle to VM 'pyfromid' is closed; the sandbox runs on"):
        other.run("true")
    # Nor does a closed handle delete (or stop) it.
    with pytest.raises(ValueError, match="this handle to VM 'pyfromid' is closed"):
        other.delete()
    assert owner.status == VMState.RUNNING
    owner.delete()
    with pytest.raises(VMNotFoundError, match="VM 'pyfromid' not found"):
        SmolVM.from_id("pyfromid")


def test_callbacks_can_veto(no_leftovers):
    seen = []
    with SmolVM() as vm:
        def pre(cmd):
            if "rm -rf" in cmd:
                raise CommandBlockedError(f"blocked: {cmd}")
            seen.append(("pre", cmd))

        vm.on_pre_run = pre
        vm.on_post_run = lambda cmd, r: seen.append(("post", r.exit_code))
        vm.on_run_error = lambda cmd, e: seen.append(("error", type(e).__name__))
        vm.run("true")
        with pytest.raises(CommandBlockedError):
            vm.run("rm -rf /")
        with pytest.raises(OperationTimeoutError):
            vm.run("sleep 10", timeout=1)
    assert seen == [("pre", "true"), ("post", 0), ("pre", "sleep 10"), ("error", "OperationTimeoutError")]


def test_leaving_the_with_block_by_an_exception_removes_the_sandbox(no_leftovers):
    with pytest.raises(RuntimeError):
        with SmolVM(vm_id="pyraise") as vm:
            assert vm.run("true").ok
            raise RuntimeError("boom")
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id("pyraise")
    # A clean-up that fails too does not hide the block's own error: it is noted on it.
    with pytest.raises(RuntimeError, match="boom") as raised:
        with SmolVM(vm_id="pyraise") as vm:
            really_delete = vm.delete

            def delete_then_fail():
                really_delete()
                raise ValueError("the clean-up's own trouble")

            vm.delete = delete_then_fail
            raise RuntimeError("boom")
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["and cleaning up the sandbox failed too: the clean-up's own trouble"]


def test_ctrl_c_during_run_is_prompt_and_leaves_no_vmm(tmp_path):
    script = textwrap.dedent(
        """
        import signal, sys, time
        # A parent that ignores SIGINT (a CI runner in the background) would pass that on.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from smolvm import SmolVM
        with SmolVM(vm_id="pyctrlc") as vm:
            print("ready", flush=True)
            try:
                vm.run("sleep 300", timeout=600)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                # The interrupted command is killed in the guest, not left to its timeout.
                for _ in range(50):
                    left = vm.run("ps -o args | grep -c '^sleep 300' || true").stdout.strip()
                    if left == "0":
                        break
                    time.sleep(0.1)
                print("left", left, flush=True)
                raise
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # Interrupted once its command runs in the guest.
        other = SmolVM.from_id("pyctrlc")
        deadline = time.monotonic() + 30
        while other.run("pgrep -x sleep || true").stdout.strip() == "":
            assert time.monotonic() < deadline, "the command never ran"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        # A `with` sandbox belongs to its process: killing the process must clean it up too.
        proc.kill()
        proc.wait()
    assert "interrupted" in rest
    assert "left 0" in rest, rest
    assert time.monotonic() - sent < 15
    assert proc.returncode != 0
    assert qemu_processes() == []
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id("pyctrlc")


def test_a_with_block_whose_start_fails_leaves_nothing(no_leftovers):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    with pytest.raises(SmolVMError, match="port_forwards"):
        with SmolVM(vm_id="failboot", port_forwards=[(port, 80)]):
            pass
    busy.close()
    # The name is free again at once (not held by a sandbox in 'error' until this process ends).
    with SmolVM(vm_id="failboot") as vm:
        assert vm.run("echo ok").output == "ok"
    # So it is after a plain start() that fails: the sandbox it made is gone again.
    with pytest.raises(ValidationError, match="boot_timeout"):
        SmolVM(vm_id="failstart").start(boot_timeout=0)
    with pytest.raises(SmolVMError):
        SmolVM(vm_id="failstart", image="no-such-image").start()
    vm = SmolVM(vm_id="failstart").start()
    vm.delete()


def test_delete_and_stop_do_not_wait_for_commands_in_flight(no_leftovers):
    import threading

    for action in ("stop", "delete"):
        vm = SmolVM(vm_id=f"inflight-{action}")
        vm.start()
        errors = []

        def worker():
            try:
                vm.run("sleep 600", timeout=900)
            except Exception as e:  # the VM went away under it
                errors.append(e)

        t = threading.Thread(target=worker)
        t.start()
        # Once the command runs in the guest: else the stop would merely come first.
        deadline = time.monotonic() + 30
        while vm.run("pgrep -x sleep || true").stdout.strip() == "":
            assert time.monotonic() < deadline, "the command never ran"
            time.sleep(0.05)
        started = time.monotonic()
        getattr(vm, action)()
        assert time.monotonic() - started < 20, f"{action} waited for the command"
        t.join(timeout=20)
        assert not t.is_alive() and errors, action
        if action == "stop":
            vm.delete()


def test_gil_is_released_while_commands_run(no_leftovers):
    import threading

    with SmolVM() as vm:
        ticks = []
        stop = threading.Event()

        def tick():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.01)

        t = threading.Thread(target=tick)
        t.start()
        vm.run("sleep 1")
        stop.set()
        t.join()
        assert len(ticks) > 20


def test_cli_is_installed_with_the_package():
    exe = os.path.join(os.path.dirname(sys.executable), "smolvm")
    out = subprocess.run([exe, "run", "echo hello from a microVM"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from a microVM\n"


def test_a_handle_survives_another_process_restarting_its_sandbox(no_leftovers):
    exe = os.path.join(os.path.dirname(sys.executable), "smolvm")
    vm = SmolVM(vm_id="restarted")
    vm.start()
    try:
        for args in (["sandbox", "stop", "restarted"], ["sandbox", "start", "restarted"]):
            out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
        # The old connection went with the old supervisor: the handle takes the new one's, as
        # its status (running) says it may.
        assert vm.status == VMState.RUNNING
        assert vm.can_run_commands()
        assert vm.run("echo again").output == "again"
        # start() on it is nothing (it does not stop it by force, nor boot it twice).
        vm.start()
        assert vm.run("echo still").output == "still"
        vm.stop()
        assert vm.status == VMState.STOPPED
    finally:
        vm.delete()


def test_a_with_blocks_sandbox_outlives_other_processes_restarting_and_using_it(no_leftovers):
    # A `with` block's sandbox goes when its owner does. Other processes' connections (the
    # CLI's start and exec here) are not the owner's: their end must not take it away.
    exe = os.path.join(os.path.dirname(sys.executable), "smolvm")
    with SmolVM() as vm:
        for args in (["sandbox", "stop", vm.vm_id], ["sandbox", "start", vm.vm_id], ["sandbox", "exec", vm.vm_id, "--", "true"]):
            out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
        assert vm.run("echo again").output == "again"
        vm_id = vm.vm_id
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm_id)


def test_ctrl_c_during_a_snapshot_gives_it_up(no_leftovers):
    script = textwrap.dedent(
        """
        import os, signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Slow saves (read by the sandbox's supervisor when it starts): seconds for this guest.
        os.environ["SMOLVM_SNAPSHOT_BANDWIDTH"] = "20"
        from smolvm import SmolVM
        with SmolVM(vm_id="pysnapint") as vm:
            vm.run("i=0; while [ $i -lt 150 ]; do cat /bin/busybox; i=$((i+1)); done > /dev/shm/fill")
            print("ready", flush=True)
            try:
                vm.snapshot("pygivenup")
                print("saved", flush=True)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            print("after:", vm.run("echo alive").output, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    state = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        snapshots = os.path.join(os.environ["SMOLVM_DATA_DIR"], "snapshots")
        for _ in range(300):
            found = [os.path.join(snapshots, d, "state") for d in os.listdir(snapshots)] if os.path.isdir(snapshots) else []
            state = next((f for f in found if os.path.exists(f) and os.path.getsize(f) > 0), None)
            if state:
                break
            time.sleep(0.05)
        assert state, "the save never began"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    # The save was cancelled and its files removed; the VM ran on; nothing was recorded.
    assert rest.splitlines() == ["interrupted", "after: alive"], rest
    assert proc.returncode == 0
    assert not os.path.exists(os.path.dirname(state))
    from smolvm.exceptions import SnapshotNotFoundError
    with pytest.raises(SnapshotNotFoundError):
        SmolVM.from_snapshot("pygivenup")


def test_pause_resume_snapshot_and_from_snapshot(no_leftovers, tmp_path):
    from smolvm.exceptions import SnapshotNotFoundError
    from smolvm.types import SnapshotInfo

    with SmolVM(vm_id="pysnapsrc", env_vars={"A": "1"}) as vm:
        vm.run("echo saved > /tmp/f")
        vm.pause()
        assert vm.status == VMState.PAUSED
        with pytest.raises(SmolVMError, match="paused"):
            vm.run("true")
        # Starting it would say nothing of the pause: refused, as the CLI's start is.
        with pytest.raises(SmolVMError, match=r"^VM 'pysnapsrc' is paused; resume it first"):
            vm.start()
        vm.resume()
        info = vm.snapshot("pysnap")
        assert info == SnapshotInfo("pysnap", "pysnapsrc", "full", info.path)
        with pytest.raises(ValidationError, match="diff"):
            vm.snapshot(snapshot_type="diff")
        with SmolVM.from_snapshot("pysnap", env_vars={"B": "2"}) as clone:
            assert clone.status == VMState.RUNNING
            assert clone.run("cat /tmp/f; echo [$A] [$B]").stdout == "saved\n[] [2]\n"
        # Mounts replace a snapshot's only where it boots anew (a 'disk' snapshot).
        with pytest.raises(ValidationError, match=r"^invalid mounts: snapshot 'pysnap' is a full snapshot, which restores without mounts"):
            SmolVM.from_snapshot("pysnap", mounts=[str(tmp_path)])
        with pytest.raises(ValidationError, match=r"^invalid writable_mounts: 'yes' is not a bool"):
            SmolVM.from_snapshot("pysnap", writable_mounts="yes")
        for bad in (5, [("/a", 5)], [(5, "/b")], ":/b"):
            with pytest.raises(ValidationError, match=r"^invalid mounts: "):
                SmolVM.from_snapshot("pysnap", mounts=bad)
        # Port forwards replace the snapshot's (a list, as VMConfig takes them).
        with pytest.raises(ValidationError, match=r"^invalid port_forwards: expected a list, got int"):
            SmolVM.from_snapshot("pysnap", port_forwards=8000)
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        with SmolVM.from_snapshot("pysnap", port_forwards=[(port, 8000)]):
            with pytest.raises(OSError):
                socket.create_server(("127.0.0.1", port)).close()
        socket.create_server(("127.0.0.1", port)).close()
        paused = SmolVM.from_snapshot("pysnap", resume_vm=False)
        assert paused.status == VMState.PAUSED
        paused.resume()
        assert paused.run("echo $A").output == "1"
        paused.delete()
    assert [s for s in SmolVM.list_snapshots() if s.snapshot_id == "pysnap"] == [info]
    SmolVM.delete_snapshot("pysnap")
    assert [s for s in SmolVM.list_snapshots() if s.snapshot_id == "pysnap"] == []
    with pytest.raises(SnapshotNotFoundError, match="^snapshot 'pysnap' not found$"):
        SmolVM.delete_snapshot("pysnap")
    with pytest.raises(SnapshotNotFoundError):
        SmolVM.from_snapshot("pysnap")


def test_upload_and_download_files(no_leftovers, tmp_path):
    src = tmp_path / "in.bin"
    payload = os.urandom(3 * 1024 * 1024)
    src.write_bytes(payload)
    with SmolVM() as vm:
        vm.upload_file(src, "/work/")
        assert vm.run("stat -c %s /work/in.bin").output == str(len(payload))
        vm.download_file("/work/in.bin", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == payload
        with pytest.raises(ValidationError, match="absolute"):
            vm.upload_file(src, "work/in.bin")
        with pytest.raises(ValidationError, match=r"^invalid guest_path: /work is a directory; to upload into it, give /work/$"):
            vm.upload_file(src, "/work")
        # A FIFO has no end to read to: refused, not read for ever.
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(ValidationError, match=r"^invalid local_path: .*/fifo is not a regular file or a directory$"):
            vm.upload_file(fifo, "/work/fifo")
        # A guest path may be a path object too.
        vm.download_file(pathlib.PurePosixPath("/work/in.bin"), tmp_path / "again.bin")
        assert (tmp_path / "again.bin").read_bytes() == payload


def test_ports_and_internet_settings(no_leftovers):
    import urllib.request

    from smolvm import InternetSettings

    with pytest.raises(ValidationError, match="169.254"):
        VMConfig(internet_settings=InternetSettings(mode="restricted", allowed_cidrs=("169.254.169.254/32",)))
    with pytest.raises(ValidationError, match="network"):
        VMConfig(network="bogus")
    with SmolVM(port_forwards=[8000], internet_settings={"mode": "off"}) as vm:
        vm.run("mkdir -p /srv && echo from-python > /srv/index.html && (httpd -p 8000 -h /srv &)")
        host_port = vm.expose_local(8000)
        # The host port picked for port_forwards at start is in the sandbox's info.
        assert vm.info.raw["ports"] == [{"guest": 8000, "host": host_port}]
        deadline = time.monotonic() + 10
        while True:
            try:
                assert urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=2).read() == b"from-python\n"
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        vm.unexpose_local(8000)
        assert vm.info.raw["ports"] == []
        with pytest.raises(ValidationError, match="not exposed"):
            vm.unexpose_local(8000)


def test_mounts_share_host_directories(tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("from the host\n")
    with pytest.raises(ValidationError, match=r"^invalid mounts: /nonexistent/dir is not an existing directory"):
        VMConfig(workspace_mounts=["/nonexistent/dir"])
    with pytest.raises(ValidationError, match="writable_mounts"):
        SmolVM(writable_mounts=True)
    with pytest.raises(ValidationError, match=r"^invalid mounts: \{'host': 'x', 'mode': 'rw'\}"):
        VMConfig(workspace_mounts=[{"host": "x", "mode": "rw"}])
    # One path alone, resolved when the config is made (a later chdir changes nothing).
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        c = VMConfig(workspace_mounts="proj")
    finally:
        os.chdir(cwd)
    assert c.workspace_mounts == [{"host": str(tmp_path / "proj"), "guest": None}]
    # Links resolved, as the CLI does: the guest sees the directory's own name.
    (tmp_path / "link").symlink_to(tmp_path / "proj")
    assert VMConfig(workspace_mounts=str(tmp_path / "link")).workspace_mounts == [{"host": str(tmp_path / "proj"), "guest": None}]
    # Host paths may hold colons: a guest path is what follows the last ":/".
    (tmp_path / "a:b").mkdir()
    c = VMConfig(workspace_mounts=[str(tmp_path / "a:b"), f"{tmp_path / 'a:b'}:/mnt/ab"])
    assert c.workspace_mounts == [{"host": str(tmp_path / "a:b"), "guest": None},
                                  {"host": str(tmp_path / "a:b"), "guest": "/mnt/ab"}]
    with pytest.raises(ValidationError, match=r"is not an existing directory .*\(a guest path is absolute: HOST:/GUEST\)$"):
        VMConfig(workspace_mounts=[f"{tmp_path / 'proj'}:mnt"])
    # Read-only by default, at /workspace/<name>; writable when asked, at the given path.
    with SmolVM(mounts=[tmp_path / "proj"]) as vm:
        assert vm.run("cat /workspace/proj/notes.txt").output == "from the host"
        assert not vm.run("echo x > /workspace/proj/new").ok
    with SmolVM(mounts=[f"{tmp_path / 'proj'}:/mnt/p"], writable_mounts=True) as vm:
        assert vm.run("echo from-guest > /mnt/p/new && cat /mnt/p/notes.txt").output == "from the host"
    assert (tmp_path / "proj" / "new").read_text() == "from-guest\n"


def test_wait_for_ports_sees_a_server_start():
    with SmolVM(network="none") as vm:
        with pytest.raises(OperationTimeoutError, match=r"^Operation 'wait_for_ports' timed out after 1s"):
            vm.wait_for_ports(8080, timeout=1)
        assert vm.run("(sleep 1; httpd -p 8080 -h /tmp) >/dev/null 2>&1 &").ok
        vm.wait_for_ports([8080], timeout=30)
        for bad in ([0], True, [8080, True], 80.0, [], None):
            with pytest.raises(ValidationError, match="^invalid ports"):
                vm.wait_for_ports(bad)


def test_a_forked_child_leaves_the_parents_handle_alone(no_leftovers):
    import gc

    vm = SmolVM(memory=256).start()
    try:
        # A child that drops its copy of the handle (as any child that exits may) must not
        # take the parent's connection with it.
        pid = os.fork()
        if pid == 0:
            del vm
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        assert vm.run("echo parent").output == "parent"
        # Nor one that closes it.
        pid = os.fork()
        if pid == 0:
            vm.close()
            os._exit(0)
        os.waitpid(pid, 0)
        assert vm.run("echo parent again").output == "parent again"
    finally:
        vm.delete()
    # close() inside the `with` block that made the sandbox leaves it running: the block's end
    # deletes it (the sandbox lives as long as that connection).
    with SmolVM(vm_id="pytied", memory=256) as tied:
        tied.close()
        time.sleep(1)
        assert SmolVM.from_id("pytied").status == VMState.RUNNING
        assert tied.run("echo still").output == "still"
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id("pytied")


def test_a_forked_child_transfers_files_and_leaves_the_parents_with_block_alone(no_leftovers, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("from the host\n")
    parent = os.getpid()
    try:
        with SmolVM(memory=256) as vm:
            # The parent's transfer first: its file work ran on threads the child does not
            # have, and the child's transfers waited on them for ever.
            vm.upload_file(str(src), "/tmp/parent.txt")
            pid = os.fork()
            if pid == 0:
                signal.alarm(60)
                vm.upload_file(str(src), "/tmp/child.txt")
                vm.download_file("/tmp/child.txt", str(tmp_path / "back.txt"))
                # Leaving the parent's `with` block (as sys.exit does) is not the end of the
                # parent's sandbox.
                raise SystemExit(0 if (tmp_path / "back.txt").read_text() == "from the host\n" else 2)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert vm.run("cat /tmp/child.txt").output == "from the host"
            assert vm.status == VMState.RUNNING
            vm_id = vm.vm_id
    except SystemExit as e:
        if os.getpid() != parent:
            os._exit(e.code)
        raise
    finally:
        if os.getpid() != parent:
            os._exit(1)
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id(vm_id)


def test_a_handle_whose_guest_powered_itself_off_says_it_is_stopped(no_leftovers):
    # The handle's connection is not watched between calls: the first call after the guest
    # went down used to fail on the dead socket ("Broken pipe") instead of saying why.
    vm = SmolVM()
    vm.start()
    try:
        vm.run("(sleep 1; poweroff) >/dev/null 2>&1 &")
        deadline = time.monotonic() + 30
        while vm.status != VMState.STOPPED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.status == VMState.STOPPED
        with pytest.raises(SmolVMError, match="is stopped; start it first"):
            vm.pause()
        # Variables of a sandbox that is not running are kept for its next start.
        assert vm.set_env_vars({"A": "1"}) == ["A"] and vm.list_env_vars() == {"A": "1"}
        vm.start()
        assert vm.run("echo $A").output == "1"
        fresh = SmolVM()
        assert fresh.set_env_vars({"B": "2", "C": "3"}) == ["B", "C"]
        assert fresh.unset_env_vars("C") == {"C": "3"} and fresh.list_env_vars() == {"B": "2"}
        with pytest.raises(ValidationError, match="Invalid environment variable key: 'BAD-KEY'") as e:
            fresh.unset_env_vars(["BAD-KEY"])
        assert e.value.details.get("field") == "keys"
        with fresh:
            assert fresh.run("echo $B$C").output == "2"
        # Never started: nothing to stop.
        SmolVM().stop()
    finally:
        vm.delete()


def test_a_with_blocks_end_finds_its_sandbox_gone_without_an_error(no_leftovers):
    # Its guest powered itself off inside the block (the sandbox goes with it), or another
    # process deleted it: the block's end used to raise VMNotFoundError from its delete.
    with SmolVM(memory=256) as vm:
        vm.run("(sleep 1; poweroff) >/dev/null 2>&1 &")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                vm.status
            except VMNotFoundError:
                break
            time.sleep(0.1)
        with pytest.raises(VMNotFoundError):
            vm.run("true")
    with SmolVM(vm_id="pygone", memory=256) as vm:
        SmolVM.from_id("pygone").delete()
    with pytest.raises(VMNotFoundError):
        SmolVM.from_id("pygone")


def test_a_backend_this_build_cannot_run_is_refused_by_the_config():
    with pytest.raises(ValidationError, match="firecracker is not supported by this build yet"):
        VMConfig(backend="firecracker")


def test_a_callers_umask_leaves_the_image_cache_closed_to_others(tmp_path, run_script):
    # The library builds in the caller's process, under its umask; 000 made the cache's entries
    # writable by every user, and later starts trust what is there (kernels, disks, recipes).
    # A fresh cache, given the kernel and busybox (minutes of building otherwise).
    shared = pathlib.Path(os.environ["SMOLVM_IMAGE_DIR"])
    kernel, _ = smolvm.build.ImageBuilder().build_default()
    images = tmp_path / "images"
    kdir = images / pathlib.Path(kernel).parent.relative_to(shared)
    kdir.mkdir(parents=True)
    shutil.copy(kernel, kdir / "vmlinux")
    for entry in shared.iterdir():
        if entry.name == "sources" or (entry.name.startswith("busybox-") and (entry / "busybox").is_file()):
            shutil.copytree(entry, images / entry.name)
    motd = tmp_path / "motd"
    motd.write_text("hi\n")
    # (Short: it holds sockets.)
    data = tempfile.mkdtemp(prefix="svu", dir="/tmp")
    run_script(
        f"""
        import os
        os.umask(0)
        from smolvm.build import ImageBuilder
        b = ImageBuilder()
        b.build_default()
        b.build_custom("umask-tools", base="busybox", files={{"/etc/motd": {str(motd)!r}}}, size_mib=64)
        from smolvm import SmolVM
        with SmolVM() as vm:
            assert vm.run("cat /proc/self/status >/dev/null").exit_code == 0
        """,
        env={"SMOLVM_IMAGE_DIR": str(images), "SMOLVM_DATA_DIR": data},
    )
    seen = []
    for root, dirs, files in [*os.walk(images), *os.walk(data)]:
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            mode = os.lstat(name).st_mode
            assert mode & 0o022 == 0, f"{name} is {oct(mode & 0o777)}"
            seen.append(name)
    shutil.rmtree(data)
    assert any(n.endswith("initramfs.cpio") for n in seen) and any(n.endswith("rootfs.ext4") for n in seen), seen
    assert any(os.path.basename(n).startswith("warm-") for n in seen), seen
    # Inside the disk too: its root and the directories the recipe adds.
    disk = next(images.glob("disk-umask-tools-*/rootfs.ext4"))
    for guest, mode in [("/", "0755"), ("/root/.ssh", "0700"), ("/var/log", "0755")]:
        stat = subprocess.run(["debugfs", "-R", f"stat {guest}", str(disk)], capture_output=True, text=True).stdout
        assert f"Mode:  {mode}" in stat, f"{guest}: {stat}"


def test_threads_starting_one_new_handle_make_one_sandbox(no_leftovers):
    # Making the sandbox lets other threads run (it may wait on the state database): two that
    # started the same new handle at once each made one, and the first ran on unreachable.
    import threading

    from smolvm import _native

    def ids():
        return {s["id"] for s in json.loads(_native.list_sandboxes())}

    before = ids()
    vm = SmolVM(memory=256)
    threads = [threading.Thread(target=vm.start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert ids() - before == {vm.vm_id}
        assert vm.run("echo one").output == "one"
    finally:
        vm.delete()
    assert ids() == before


def test_start_of_a_running_sandbox_does_not_wait_for_its_commands(no_leftovers):
    # A start takes the handle alone; one that had nothing to do waited for every command in
    # flight on other threads to end first.
    import threading

    with SmolVM(memory=256) as vm:
        running = threading.Thread(target=vm.run, args=("sleep 4",))
        running.start()
        time.sleep(0.5)
        vm.start()
        assert running.is_alive(), "the start waited for the command"
        running.join()
