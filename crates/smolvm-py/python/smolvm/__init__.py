"""smolvm: sandboxes for AI agents, as real microVMs with their own kernel.

    from smolvm import SmolVM

    with SmolVM() as vm:
        print(vm.run("echo hello from a microVM").output)
"""

from __future__ import annotations

import os
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bundled_binary(name: str) -> Optional[str]:
    path = os.path.join(_HERE, "bin", name)
    return path if os.access(path, os.X_OK) else None


# The library starts a supervisor process per sandbox (the `smolvm` binary) and puts the guest
# agent into images; a wheel carries both. Explicit settings win.
for _var, _name in (("SMOLVM_BIN", "smolvm"), ("SMOLVM_AGENT_BIN", "smolvm-agent")):
    _path = _bundled_binary(_name)
    if _path and not os.environ.get(_var):
        os.environ[_var] = _path

from .config import InternetSettings, VMConfig  # noqa: E402
from . import exceptions as _exceptions  # noqa: E402
from .exceptions import *  # noqa: E402,F401,F403
from .types import CommandResult, VMInfo, VMState  # noqa: E402
from .vm import SmolVM  # noqa: E402

__all__ = ["SmolVM", "VMConfig", "InternetSettings", "CommandResult", "VMState", "VMInfo", *_exceptions.__all__]
