"""The `smolvm` command installed with the package: runs the bundled binary."""

import os
import sys

from . import _bundled_binary


def main() -> None:
    exe = _bundled_binary("smolvm")
    if exe is None:
        sys.stderr.write("smolvm: the bundled smolvm binary is missing from this installation\n")
        raise SystemExit(1)
    os.execv(exe, [exe, *sys.argv[1:]])
