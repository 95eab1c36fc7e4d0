"""SSH-capable images and the SSH channel through the Python API, on real VMs."""

import hashlib
import os
import subprocess

import pytest

from smolvm import SmolVM, VMConfig
from smolvm.build import SSH_BOOT_ARGS, ImageBuilder
from smolvm.exceptions import CommandExecutionUnavailableError, OperationTimeoutError, ValidationError


def test_documented_alpine_ssh_recipe_boots_and_answers_over_ssh(no_leftovers):
    builder = ImageBuilder()
    kernel, rootfs = builder.build_alpine_ssh()
    assert os.path.isfile(kernel) and os.path.isfile(rootfs)
    assert builder.build_alpine_ssh() == (kernel, rootfs) and builder.last_cached is True
    # The default image by name is the kernel and initramfs, and says nothing of a disk cache.
    assert builder.build("default") == builder.build_default() and builder.last_cached is None
    config = VMConfig(kernel_path=kernel, rootfs_path=rootfs, boot_args=SSH_BOOT_ARGS)
    with SmolVM(config, comm_channel="ssh") as vm:
        vm.wait_for_ssh(timeout=60)
        r = vm.run("echo via-ssh; echo oops >&2; exit 2")
        assert (r.exit_code, r.stdout, r.stderr, r.ok, r.output) == (2, "via-ssh\n", "oops\n", False, "via-ssh")
        with pytest.raises(OperationTimeoutError):
            vm.run("sleep 30", timeout=1)
        assert vm.run("echo still").output == "still"


def test_named_image_sftp_round_trip_and_user_key(no_leftovers, tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = (tmp_path / "k.pub").read_text().strip()
    data = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    with SmolVM(image="alpine-ssh", comm_channel="ssh", disk_size=1024,
                config=VMConfig(ssh_public_key=pub)) as vm:
        vm.wait_for_ssh()
        vm.upload_file(src, "/data/")
        vm.download_file("/data/big.bin", tmp_path / "back.bin")
        assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
        with pytest.raises(ValidationError, match="guest_path"):
            vm.upload_file(src, "data/x")
        assert pub in vm.run("cat /root/.ssh/authorized_keys").stdout
        size_mib = int(vm.run("df -m / | tail -1 | awk '{print $2}'").output)
        assert size_mib > 900


def test_ssh_errors_are_clear(no_leftovers):
    with pytest.raises(ValidationError, match="disk_size_mib"):
        SmolVM(disk_size=1024)
    with pytest.raises(ValidationError, match="comm_channel"):
        SmolVM(comm_channel="carrier-pigeon")
    with pytest.raises(ValidationError, match="ssh_public_key"):
        VMConfig(ssh_public_key="not a key")
    with pytest.raises(ValidationError, match="image"):
        SmolVM(image="No Such Image")
    with SmolVM() as vm:
        with pytest.raises(CommandExecutionUnavailableError, match="no SSH server"):
            vm.wait_for_ssh(timeout=5)
