"""Guest images. Built locally once, cached by a fingerprint of their inputs, then reused."""

from __future__ import annotations

from typing import Tuple

from . import _native
from ._errors import call

# Kernel arguments for booting an image with a root disk. smolvm's own boot settings come
# first; these are appended and repeat the ones an SSH-capable image relies on.
SSH_BOOT_ARGS = "console=ttyS0 reboot=t panic=-1 pci=off"


class ImageBuilder:
    """Builds the images sandboxes boot."""

    def build_default(self) -> Tuple[str, str]:
        """The default minimal image: ``(kernel_path, initrd_path)``."""
        kernel, initrd, _ = call(_native.build_image, False)
        return kernel, initrd

    def build_alpine_ssh(self) -> Tuple[str, str]:
        """``(kernel_path, rootfs_path)`` of a bootable image with a root disk.

        Until SSH images land, this is smolvm's minimal busybox root filesystem (ext4),
        driven by the guest agent; it is not Alpine and has no sshd yet.
        """
        kernel, _, rootfs = call(_native.build_image, True)
        return kernel, rootfs


__all__ = ["ImageBuilder", "SSH_BOOT_ARGS"]
