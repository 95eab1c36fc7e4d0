import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

# Short data directory (Unix socket paths), shared image cache (the kernel is built once).
_DATA = tempfile.mkdtemp(prefix="svp", dir="/tmp")
os.environ["SMOLVM_DATA_DIR"] = _DATA
os.environ.setdefault("SMOLVM_IMAGE_DIR", os.path.expanduser("~/.local/state/smolvm/images"))
for var in ("SMOLVM_BACKEND", "SMOLVM_VERBOSE_BOOT", "SMOLVM_BIN", "SMOLVM_AGENT_BIN"):
    os.environ.pop(var, None)


def _kill_leftovers():
    """Kill what a failed test left running (its supervisors exit with their QEMU) and remove
    its files, so that the next test starts clean and blame stays with the test that leaked."""
    for pid in qemu_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while qemu_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    for entry in os.listdir(_DATA):
        path = os.path.join(_DATA, entry)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def pytest_sessionfinish(session, exitstatus):
    _kill_leftovers()
    shutil.rmtree(_DATA, ignore_errors=True)


@pytest.fixture
def run_script():
    """Run a documentation example as its own Python program; return its stdout."""

    def run(code: str, env=None) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **(env or {})},
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return run


def qemu_processes():
    """QEMU processes of this session's sandboxes (their command lines name our data dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and _DATA in cmd:
            out.append(int(pid))
    return out


def our_tables():
    """nftables tables of this session's sandboxes: each table's comment names its sandbox and
    data directory (as resolved)."""
    try:
        rules = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    ours, table = [], None
    mark = f' in {os.path.realpath(_DATA)}"'
    for line in rules.splitlines():
        if line.startswith("table inet "):
            table = line.split()[2]
        elif table and line.strip().startswith("comment ") and line.strip().endswith(mark):
            ours.append(table)
    return ours


@pytest.fixture
def no_leftovers():
    yield
    running = qemu_processes()
    vms = os.path.join(_DATA, "vms")
    files = os.listdir(vms) if os.path.isdir(vms) else []
    if running or files:
        _kill_leftovers()
    # A table goes before a stop or delete returns; those of sandboxes left running go once
    # their supervisors find their VMs killed.
    deadline = time.monotonic() + 10
    while our_tables() and time.monotonic() < deadline:
        time.sleep(0.1)
    tables = our_tables()
    for table in tables:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    assert running == [], "VMs left running"
    assert files == [], "sandbox files left behind"
    assert tables == [], "firewall tables left behind"
