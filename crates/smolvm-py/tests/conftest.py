import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

# Short data directory (Unix socket paths), shared image cache (the kernel is built once).
_DATA = tempfile.mkdtemp(prefix="svp", dir="/tmp")
os.environ["SMOLVM_DATA_DIR"] = _DATA
os.environ.setdefault("SMOLVM_IMAGE_DIR", os.path.expanduser("~/.local/state/smolvm/images"))
for var in ("SMOLVM_BACKEND", "SMOLVM_VERBOSE_BOOT", "SMOLVM_BIN", "SMOLVM_AGENT_BIN"):
    os.environ.pop(var, None)


def pytest_sessionfinish(session, exitstatus):
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


@pytest.fixture
def no_leftovers():
    yield
    assert qemu_processes() == []
    vms = os.path.join(_DATA, "vms")
    assert not os.path.isdir(vms) or os.listdir(vms) == []
