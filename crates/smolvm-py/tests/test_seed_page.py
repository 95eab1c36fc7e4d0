"""Every example of the environment-variables page, run as users run it."""

import ast
import os


def test_setting_variables_at_boot(run_script):
    out = run_script(
        """
        from smolvm import SmolVM, VMConfig
        from smolvm.build import ImageBuilder, SSH_BOOT_ARGS

        builder = ImageBuilder()
        kernel, rootfs = builder.build_alpine_ssh()

        config = VMConfig(
            vm_id="env-vm",
            vcpu_count=1,
            memory=512,
            kernel_path=kernel,
            rootfs_path=rootfs,
            boot_args=SSH_BOOT_ARGS,
            env_vars={
                "APP_MODE": "production",
                "DATABASE_URL": "postgres://localhost:5432/mydb",
                "API_KEY": "secret-key-value",
            },
        )

        with SmolVM(config) as vm:
            result = vm.run("echo $APP_MODE")
            print(result.output)
            print(vm.run("cat /etc/profile.d/smolvm_env.sh").stdout, end="")
        """
    )
    assert out == (
        "production\n"
        "#!/bin/sh\n# SmolVM managed environment variables\n\n"
        "export API_KEY='secret-key-value'\n"
        "export APP_MODE='production'\n"
        "export DATABASE_URL='postgres://localhost:5432/mydb'\n"
    )


def test_setting_variables_at_runtime(run_script):
    out = run_script(
        """
        from smolvm import SmolVM

        with SmolVM() as vm:
            vm.set_env_vars({"APP_MODE": "dev", "DEBUG": "1"})
            result = vm.run("echo APP_MODE=$APP_MODE DEBUG=$DEBUG")
            print(result.output)
            env_vars = vm.list_env_vars()
            print(env_vars)
            removed = vm.unset_env_vars(["DEBUG"])
            print(removed)
            result = vm.run("echo DEBUG=$DEBUG")
            print(result.output)
        """
    )
    assert out.splitlines() == ["APP_MODE=dev DEBUG=1", "{'APP_MODE': 'dev', 'DEBUG': '1'}", "{'DEBUG': '1'}", "DEBUG="]


def test_method_reference_examples(run_script):
    out = run_script(
        """
        from smolvm import SmolVM

        with SmolVM() as vm:
            print(vm.set_env_vars({"NEW_VAR": "value"}))
            print(vm.set_env_vars({"ONLY_VAR": "value"}, merge=False))
            vm.set_env_vars({"VAR1": "a", "VAR2": "b"})
            env_vars = vm.list_env_vars()
            for key, value in env_vars.items():
                print(f"{key}={value}")
            removed = vm.unset_env_vars(["VAR1", "VAR2"])
            print(f"Removed: {removed}")
        """
    )
    assert out.splitlines() == [
        "['NEW_VAR']",
        "['ONLY_VAR']",
        "ONLY_VAR=value",
        "VAR1=a",
        "VAR2=b",
        "Removed: {'VAR1': 'a', 'VAR2': 'b'}",
    ]


def test_complete_example(run_script):
    # The page's complete example is the repository's examples/env_injection.py.
    example = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "env_injection.py")
    with open(example) as f:
        out = run_script(f.read())
    lines = out.splitlines()
    assert lines[0].startswith("VM started: sbx-")
    assert lines[1:] == [
        "",
        "1) Set environment variables",
        "{'APP_MODE': 'dev', 'DEBUG': '1'}",
        "",
        "2) Use env vars in a command",
        "APP_MODE=dev DEBUG=1",
        "",
        "3) Remove one variable",
        "Removed: {'DEBUG': '1'}",
        "{'APP_MODE': 'dev'}",
        "",
        "Done.",
    ]


def test_passing_host_environment_into_the_sandbox(run_script):
    out = run_script(
        """
        import os
        from smolvm import SmolVM, VMConfig
        from smolvm.build import ImageBuilder, SSH_BOOT_ARGS

        def collect_host_env() -> dict[str, str]:
            env_vars = {}
            if api_key := os.getenv("OPENAI_API_KEY"):
                env_vars["OPENAI_API_KEY"] = api_key
            if api_key := os.getenv("ANTHROPIC_API_KEY"):
                env_vars["ANTHROPIC_API_KEY"] = api_key
            return env_vars

        builder = ImageBuilder()
        kernel, rootfs = builder.build_alpine_ssh()

        config = VMConfig(
            vm_id="host-env-vm",
            vcpu_count=1,
            memory=512,
            kernel_path=kernel,
            rootfs_path=rootfs,
            boot_args=SSH_BOOT_ARGS,
            env_vars=collect_host_env(),
        )

        with SmolVM(config) as vm:
            result = vm.run("env | grep API_KEY | sort")
            print(result.output)
        """,
        env={"OPENAI_API_KEY": "sk-openai-test", "ANTHROPIC_API_KEY": "sk-ant-test"},
    )
    assert out == "ANTHROPIC_API_KEY=sk-ant-test\nOPENAI_API_KEY=sk-openai-test\n"


def test_variable_validation(run_script):
    out = run_script(
        """
        from smolvm.env import validate_env_key

        validate_env_key("MY_VAR")
        validate_env_key("_PRIVATE")
        validate_env_key("VAR_123")
        for bad in ["", "123VAR", "MY-VAR"]:
            try:
                validate_env_key(bad)
            except ValueError as e:
                print(f"ValueError: {e}")
        """
    )
    assert out.splitlines() == [
        "ValueError: Environment variable key cannot be empty",
        "ValueError: Invalid environment variable key: '123VAR'. Keys must match [A-Za-z_][A-Za-z0-9_]*",
        "ValueError: Invalid environment variable key: 'MY-VAR'. Keys must match [A-Za-z_][A-Za-z0-9_]*",
    ]


def test_quoting_secrets_and_dynamic_updates(run_script):
    out = run_script(
        """
        import os
        from smolvm import SmolVM

        def get_secret(name):
            return "p@ss'w0rd $(touch /tmp/pwned) `id`"

        with SmolVM() as vm:
            vm.set_env_vars({
                "MESSAGE": "Hello, World!",
                "PATH_VAR": "/usr/local/bin:/usr/bin",
                "COMPLEX": "value with 'quotes' and spaces",
            })
            vm.set_env_vars({
                "API_KEY": os.getenv("API_KEY", "default-key"),
                "DB_PASSWORD": get_secret("db-password"),
            })
            print(repr(vm.list_env_vars()))
            print(vm.run('printf %s "$COMPLEX|$DB_PASSWORD|$API_KEY"').stdout)
            print(vm.run("ls /tmp/pwned 2>/dev/null || echo no-file").output)
            vm.set_env_vars({"APP_MODE": "dev"})
            print(vm.run("echo $APP_MODE").output)
            vm.set_env_vars({"APP_MODE": "production"})
            print(vm.run("echo $APP_MODE").output)
            # Troubleshooting: login shells see the variables, raw ones need not.
            print(vm.can_run_commands())
            print(vm.run("echo [$APP_MODE]", shell="login").output)
            print(vm.run("echo [$APP_MODE]", shell="raw").output)
        """
    )
    lines = out.splitlines()
    assert ast.literal_eval(lines[0]) == {
        "API_KEY": "default-key",
        "COMPLEX": "value with 'quotes' and spaces",
        "DB_PASSWORD": "p@ss'w0rd $(touch /tmp/pwned) `id`",
        "MESSAGE": "Hello, World!",
        "PATH_VAR": "/usr/local/bin:/usr/bin",
    }
    assert lines[1] == "value with 'quotes' and spaces|p@ss'w0rd $(touch /tmp/pwned) `id`|default-key"
    assert lines[2:] == ["no-file", "dev", "production", "True", "[production]", "[]"]
