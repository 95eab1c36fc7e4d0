"""Guest images. Built locally once, cached by a fingerprint of their recipe, then reused.

Images with a root disk are built from Debian packages (mmdebstrap into a directory, then
``mkfs.ext4 -d``): no Docker, nothing mounted on the host.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Tuple

from . import _args, _native
from ._errors import call
from .exceptions import ValidationError

# Kernel arguments for booting an image with a root disk. smolvm's own boot settings come
# first; these are appended and repeat the ones an SSH-capable image relies on. Nothing that
# depends on the machine: `pci=off` (which smolvm gives on microvm itself) would hide q35's
# devices, the agent's port and the root disk among them.
SSH_BOOT_ARGS = "console=ttyS0 reboot=t panic=-1"


class ImageBuilder:
    """Builds the images sandboxes boot. Each returns paths usable in :class:`VMConfig`
    (``kernel_path``, ``rootfs_path``); the same images are also available by name
    (``SmolVM(image="debian-ssh")``, ``smolvm sandbox create --image debian-ssh``)."""

    def __init__(self) -> None:
        self.last_cached: Optional[bool] = None

    def build_default(self) -> Tuple[str, str]:
        """The default minimal image: ``(kernel_path, initrd_path)``. It has no root disk, and
        ``last_cached`` is ``None`` after it (it tells of root disks only)."""
        self.last_cached = None
        kernel, initrd, _ = call(_native.build_image, False)
        return kernel, initrd

    def _named(self, name: str, recipe: Optional[dict] = None) -> Tuple[str, str]:
        kernel, rootfs, cached = call(_native.build_named_image, name, json.dumps(recipe) if recipe else None)
        self.last_cached = cached
        return kernel, rootfs

    def build_alpine_ssh(self) -> Tuple[str, str]:
        """``(kernel_path, rootfs_path)`` of a small SSH-capable image.

        Alpine's mirror is not reachable everywhere smolvm runs, so this is the smallest
        equivalent built from Debian packages: busybox, dropbear (SSH server, key-only root
        login) and OpenSSH's sftp-server, about 40 MB.
        """
        return self._named("alpine-ssh")

    def build_debian_ssh_key(self) -> Tuple[str, str]:
        """``(kernel_path, rootfs_path)`` of Debian bookworm with openssh-server (key-only root
        login), python3 and ca-certificates."""
        return self._named("debian-ssh")

    def build_custom(
        self,
        name: str,
        *,
        base: str = "debian",
        packages: Iterable[str] = (),
        files: Optional[Mapping[str, "os.PathLike[str] | str"]] = None,
        size_mib: int = 2048,
    ) -> Tuple[str, str]:
        """A named recipe: ``base`` ``"debian"`` (apt installs ``packages``) or ``"busybox"``
        (packages unpacked beside busybox), ``files`` as ``{guest_path: host_path}``. Saved
        under ``name`` so that ``SmolVM(image=name)`` finds it; rebuilt only when it changes."""
        files = {} if files is None else files
        if not isinstance(files, Mapping):
            raise ValidationError("invalid files: expected a mapping of guest paths to host paths", {"field": "files"})
        recipe = {
            "name": _args.text(name, "name"),
            "base": _args.text(base, "base"),
            "packages": _args.names(packages, "packages"),
            "files": [{"source": os.path.abspath(_args.path(src, "files")), "dest": _args.text(dest, "files")} for dest, src in files.items()],
            "size_mib": _args.count(size_mib, "size_mib", "MiB"),
        }
        return self._named(name, recipe)

    def build(self, name: str) -> Tuple[str, str]:
        """A built-in image (``alpine-ssh``, ``debian-ssh``) or a saved custom recipe, by name:
        ``(kernel_path, rootfs_path)``. ``"default"`` is :meth:`build_default`, whose second
        path is its initramfs."""
        if _args.text(name, "name") == "default":
            return self.build_default()
        return self._named(name)


__all__ = ["ImageBuilder", "SSH_BOOT_ARGS"]
