"""Environment variables in a sandbox: set them, use them in a command, remove one.

The complete example of docs/environment-variables.md. Run it with the wheel installed
(`make wheel && pip install dist/smolvm-*.whl`): `python examples/env_injection.py`.
"""

from smolvm import SmolVM


def main() -> int:
    with SmolVM() as vm:
        print(f"VM started: {vm.vm_id}")

        print("\n1) Set environment variables")
        vm.set_env_vars({"APP_MODE": "dev", "DEBUG": "1"})
        print(vm.list_env_vars())

        print("\n2) Use env vars in a command")
        # Every run() starts a fresh login shell, which reads the current values.
        print(vm.run("echo APP_MODE=$APP_MODE DEBUG=$DEBUG").output)

        print("\n3) Remove one variable")
        removed = vm.unset_env_vars(["DEBUG"])
        print(f"Removed: {removed}")
        print(vm.list_env_vars())

    print("\nDone.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
