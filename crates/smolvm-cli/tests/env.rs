//! The documented environment-variables page, example by example, on real VMs.

mod common;

use common::*;
use smolvm::{RunOptions, Shell, VmConfig};
use std::collections::BTreeMap;
use std::time::Duration;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn opts() -> RunOptions {
    RunOptions { timeout: Duration::from_secs(20), ..Default::default() }
}

/// "Setting variables at boot" and "Passing host environment into the sandbox".
#[tokio::test]
async fn variables_given_at_creation_are_there_before_the_first_command() {
    let env = env();
    let config = VmConfig {
        vm_id: Some("env-vm".into()),
        vcpu_count: 1,
        memory: 512,
        env_vars: vars(&[("APP_MODE", "production"), ("DATABASE_URL", "postgres://localhost:5432/mydb"), ("API_KEY", "secret-key-value")]),
        ..Default::default()
    };
    let sb = env.boot(config).await;
    assert_eq!(sb.run("echo $APP_MODE", &opts()).await.unwrap().output(), "production");
    assert_eq!(sb.run("env | grep API_KEY", &opts()).await.unwrap().output(), "API_KEY=secret-key-value");
    let file = sb.run("cat /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap();
    assert_eq!(
        file.stdout,
        "#!/bin/sh\n# SmolVM managed environment variables\n\n\
         export API_KEY='secret-key-value'\n\
         export APP_MODE='production'\n\
         export DATABASE_URL='postgres://localhost:5432/mydb'\n"
    );
    sb.delete().await.unwrap();
}

/// The file as SPEC.md words it, written out here rather than by the code under test: the
/// header, a blank line, then `export KEY='value'` sorted by key, each `'` of a value closed,
/// given in double quotes, and reopened.
fn documented_file(vars: &BTreeMap<String, String>) -> String {
    let mut out = String::from("#!/bin/sh\n# SmolVM managed environment variables\n\n");
    for (k, v) in vars {
        out += &format!("export {k}='{}'\n", v.replace('\'', "'\"'\"'"));
    }
    out
}

/// "Setting variables at runtime" and the complete example.
#[tokio::test]
async fn runtime_set_list_unset_as_documented() {
    let env = env();
    let mut sb = env.boot(VmConfig::default()).await;
    let names = sb.set_env_vars(&vars(&[("APP_MODE", "dev"), ("DEBUG", "1")]), true).await.unwrap();
    assert_eq!(names, ["APP_MODE", "DEBUG"]);
    assert_eq!(sb.run("echo APP_MODE=$APP_MODE DEBUG=$DEBUG", &opts()).await.unwrap().output(), "APP_MODE=dev DEBUG=1");
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("APP_MODE", "dev"), ("DEBUG", "1")]));
    let removed = sb.unset_env_vars(&["DEBUG".into()]).await.unwrap();
    assert_eq!(removed, vars(&[("DEBUG", "1")]));
    assert_eq!(sb.run("echo DEBUG=$DEBUG", &opts()).await.unwrap().output(), "DEBUG=");
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("APP_MODE", "dev")]));

    // Merge (default) and replace.
    assert_eq!(sb.set_env_vars(&vars(&[("NEW_VAR", "value")]), true).await.unwrap(), ["APP_MODE", "NEW_VAR"]);
    assert_eq!(sb.set_env_vars(&vars(&[("ONLY_VAR", "value")]), false).await.unwrap(), ["ONLY_VAR"]);
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("ONLY_VAR", "value")]));
    // "Dynamic configuration updates": a change is visible to the next command.
    sb.set_env_vars(&vars(&[("APP_MODE", "dev")]), true).await.unwrap();
    assert_eq!(sb.run("echo $APP_MODE", &opts()).await.unwrap().output(), "dev");
    sb.set_env_vars(&vars(&[("APP_MODE", "production")]), true).await.unwrap();
    assert_eq!(sb.run("echo $APP_MODE", &opts()).await.unwrap().output(), "production");

    // Missing keys are ignored and nothing is rewritten (same inode: no rename happened).
    let inode = sb.run("stat -c %i /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout;
    assert_eq!(sb.unset_env_vars(&["NOT_THERE".into()]).await.unwrap(), BTreeMap::new());
    assert_eq!(sb.run("stat -c %i /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout, inode);

    // Raw shells do not read the profile.
    let raw = sb.run("echo \"[$APP_MODE]\"", &RunOptions { shell: Shell::Raw, ..opts() }).await.unwrap();
    assert_eq!(raw.output(), "[]");

    // Removing the last variable leaves the documented empty file.
    sb.unset_env_vars(&["APP_MODE".into(), "ONLY_VAR".into()]).await.unwrap();
    let file = sb.run("cat /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap();
    assert_eq!(file.stdout, "# SmolVM environment variables (empty)\n");
    assert_eq!(sb.list_env_vars().await.unwrap(), BTreeMap::new());

    // A file edited by hand, with extra blanks and comments, is still read; the next change
    // writes it back in the documented format.
    let edit = "printf '#!/bin/sh\\n# mine\\nexport   EDITED=yes   # by hand\\n' > /etc/profile.d/smolvm_env.sh";
    assert!(sb.run(edit, &opts()).await.unwrap().ok());
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("EDITED", "yes")]));
    sb.set_env_vars(&vars(&[("MORE", "1")]), true).await.unwrap();
    let file = sb.run("cat /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap();
    assert_eq!(file.stdout, "#!/bin/sh\n# SmolVM managed environment variables\n\nexport EDITED='yes'\nexport MORE='1'\n");

    // The file removed by hand, then a variable unset that only the stored set still had: the
    // next start must not bring it back.
    assert!(sb.run("rm /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().ok());
    assert_eq!(sb.unset_env_vars(&["MORE".into()]).await.unwrap(), BTreeMap::new());
    sb.stop(Duration::from_secs(10)).await.unwrap();
    assert_eq!(sb.list_env_vars().await.unwrap(), BTreeMap::new());
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo \"[$MORE]\"", &opts()).await.unwrap().output(), "[]");
    sb.delete().await.unwrap();
}

/// A sandbox that is not running keeps its variables in its config: they are set, removed and
/// listed there, and its next start puts them in place (this was refused: "start it first").
#[tokio::test]
async fn variables_of_a_sandbox_not_running_live_in_its_config_until_it_starts() {
    let env = env();
    let mut sb = env.boot(VmConfig { env_vars: vars(&[("KEPT", "1"), ("GONE", "2")]), ..Default::default() }).await;
    sb.stop(Duration::from_secs(10)).await.unwrap();
    assert_eq!(sb.set_env_vars(&vars(&[("ADDED", "a b")]), true).await.unwrap(), ["ADDED", "GONE", "KEPT"]);
    assert_eq!(sb.unset_env_vars(&["GONE".into(), "NEVER".into()]).await.unwrap(), vars(&[("GONE", "2")]));
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("ADDED", "a b"), ("KEPT", "1")]));
    // The CLI's, on a sandbox never started.
    let out = env.smolvm(&["sandbox", "create", "--no-start", "--name", "fresh"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&env.smolvm(&["sandbox", "env", "set", "fresh", "X=9"])), "X\n");
    // Too much in all is refused as at creation, and nothing is kept.
    let big = "v".repeat(100_000);
    let many: BTreeMap<String, String> = (0..11).map(|i| (format!("BIG{i}"), big.clone())).collect();
    let err = sb.set_env_vars(&many, true).await.unwrap_err();
    assert!(err.to_string().starts_with("the environment variables would take "), "{err}");
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    assert_eq!(sb.run("echo \"[$ADDED][$KEPT][$GONE]\"", &opts()).await.unwrap().output(), "[a b][1][]");
    assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("ADDED", "a b"), ("KEPT", "1")]));
    assert!(env.smolvm(&["sandbox", "start", "fresh"]).status.success());
    assert_eq!(stdout(&env.smolvm(&["sandbox", "exec", "fresh", "--", "echo $X"])), "9\n");
    // A paused one's are its guest's: refused until it resumes.
    sb.pause().await.unwrap();
    let err = sb.set_env_vars(&vars(&[("P", "1")]), true).await.unwrap_err();
    assert!(err.to_string().contains("is paused; resume it first"), "{err}");
    sb.delete().await.unwrap();
    assert!(env.smolvm(&["sandbox", "delete", "--force", "fresh"]).status.success());
}

#[tokio::test]
async fn hard_values_round_trip_byte_for_byte_and_never_run() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let long: String = (0..64 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let hard = vars(&[
        ("MESSAGE", "Hello, World!"),
        ("PATH_VAR", "/usr/local/bin:/usr/bin"),
        ("COMPLEX", "value with 'quotes' and spaces"),
        ("DQ", "say \"hi\" \\ back\\slash"),
        ("DOLLAR", "$HOME ${PATH} $(touch /tmp/x) `touch /tmp/y`"),
        ("NEWLINES", "line1\nline2\n\n"),
        ("TABS", "\ta\tb\t"),
        ("UNICODE", "héllo ✓ 日本 🚀"),
        ("EMPTY", ""),
        ("LONG", &long),
    ]);
    sb.set_env_vars(&hard, true).await.unwrap();
    assert_eq!(sb.list_env_vars().await.unwrap(), hard);
    for (k, v) in &hard {
        let r = sb.run(&format!("printf %s \"${k}\""), &opts()).await.unwrap();
        assert!(r.stdout == *v, "{k}: got {:?}", r.stdout.chars().take(80).collect::<String>());
    }
    let r = sb.run("ls /tmp/x /tmp/y 2>&1; echo done", &opts()).await.unwrap();
    assert!(r.stdout.contains("No such file") && !r.stdout.contains("\n/tmp/x"), "{}", r.stdout);

    // The file: exact rendering, mode 0644, no temp file beside it.
    let file = sb.run("cat /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap();
    assert!(file.stdout == documented_file(&hard), "{}", file.stdout.chars().take(400).collect::<String>());
    let r = sb.run("stat -c %a /etc/profile.d/smolvm_env.sh; ls -a /etc/profile.d", &opts()).await.unwrap();
    assert_eq!(r.stdout, "644\n.\n..\nsmolvm_env.sh\n");
    sb.delete().await.unwrap();
}

#[tokio::test]
async fn bad_keys_are_refused_with_the_documented_messages_and_nothing_is_written() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    sb.set_env_vars(&vars(&[("KEEP", "1")]), true).await.unwrap();
    let before = sb.run("cat /etc/profile.d/smolvm_env.sh; stat -c %i /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout;
    let err = sb.set_env_vars(&vars(&[("GOOD", "1"), ("MY-VAR", "2")]), true).await.unwrap_err();
    assert_eq!(err.to_string(), "Invalid environment variable key: 'MY-VAR'. Keys must match [A-Za-z_][A-Za-z0-9_]*");
    let err = sb.set_env_vars(&vars(&[("", "x")]), false).await.unwrap_err();
    assert_eq!(err.to_string(), "Environment variable key cannot be empty");
    let err = sb.set_env_vars(&vars(&[("123VAR", "x")]), true).await.unwrap_err();
    assert!(err.to_string().starts_with("Invalid environment variable key: '123VAR'"));
    let err = sb.unset_env_vars(&["KEEP".into(), "BAD KEY".into()]).await.unwrap_err();
    assert!(err.to_string().starts_with("Invalid environment variable key: 'BAD KEY'"));
    let err = sb.set_env_vars(&vars(&[("NUL", "a\0secret")]), true).await.unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
    let after = sb.run("cat /etc/profile.d/smolvm_env.sh; stat -c %i /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout;
    assert_eq!(before, after);
    // Bad keys in a config are refused before anything boots.
    let bad = VmConfig { env_vars: vars(&[("MY-VAR", "1")]), ..Default::default() };
    assert!(smolvm::Sandbox::create_in(env.dirs.clone(), bad, false).is_err());
    sb.delete().await.unwrap();
}

/// A variable may be as long as the kernel hands to a program (128 KiB with its name), and
/// all of them together 1 MiB: past that every command of a login shell would fail to start.
/// The guest checks the total after a merge too, and writes nothing then.
#[tokio::test]
async fn variables_are_as_large_as_commands_can_take_and_no_larger() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let big = "v".repeat(120 * 1024);
    for i in 0..8 {
        sb.set_env_vars(&vars(&[(&format!("BIG{i}"), &big)]), true).await.unwrap();
    }
    // (`env` is a program: it started with all of them.)
    let r = sb.run("echo ${#BIG0} ${#BIG7}; env | wc -c", &opts()).await.unwrap();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "122880 122880", "{}", r.stderr);
    assert!(lines[1].trim().parse::<usize>().unwrap() > 8 * 122_880, "{}", r.stdout);
    let before = sb.run("md5sum /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout;
    // A validation error, as on a sandbox that is not running (it was the agent's "guest" one).
    let err = sb.set_env_vars(&vars(&[("BIG8", &big)]), true).await.unwrap_err();
    assert_eq!(err.code(), "validation");
    let err = err.to_string();
    assert_eq!(
        err,
        "the environment variables would take 1105974 bytes; at most 1048576 are allowed, to leave room for the arguments of the commands they are given to"
    );
    assert!(!err.contains("vvvv"), "the value leaked into the message");
    assert_eq!(sb.run("md5sum /etc/profile.d/smolvm_env.sh", &opts()).await.unwrap().stdout, before);
    let err = sb.set_env_vars(&vars(&[("HUGE", &"v".repeat(200 * 1024))]), true).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "environment variable 'HUGE' takes 204805 bytes with its name; at most 131071 are allowed (the kernel hands no longer variable to a program it starts)"
    );
    // A command's own variables too.
    let opts = RunOptions { env: vars(&[("HUGE", &"v".repeat(200 * 1024))]), ..opts() };
    assert!(sb.run("true", &opts).await.unwrap_err().to_string().starts_with("environment variable 'HUGE' takes"));
    sb.delete().await.unwrap();
}

/// Root in the guest can put anything where the managed file lies: the agent (PID 1) reads
/// only a regular file of a size it could have written. A FIFO there held it for good (every
/// command then timed out), and `/dev/zero` or a file of 100 MB ran the guest out of memory.
/// Writing it anew puts a real file back.
#[tokio::test]
async fn an_env_file_that_is_not_ours_is_an_error_not_a_dead_guest() {
    let env = env();
    let sb = env.boot(VmConfig::default()).await;
    let raw = RunOptions { shell: smolvm::Shell::Raw, ..opts() };
    for (make, says) in [
        ("mkfifo", "is not the file smolvm wrote (not a regular file of at most 8388608 bytes)"),
        ("ln -s /dev/zero", "(it is not the file smolvm wrote)"),
        ("head -c 9000000 /dev/zero | tr '\\0' '#' >", "is not the file smolvm wrote (not a regular file of at most 8388608 bytes)"),
    ] {
        let r = sb.run(&format!("rm -f /etc/profile.d/smolvm_env.sh; {make} /etc/profile.d/smolvm_env.sh"), &raw).await.unwrap();
        assert_eq!(r.exit_code, 0, "{make}: {}", r.stderr);
        let e = sb.list_env_vars().await.unwrap_err().to_string();
        assert!(e.starts_with("guest agent: ") && e.contains(says), "{make}: {e}");
        assert_eq!(sb.run("echo alive", &raw).await.unwrap().stdout, "alive\n", "{make}");
        // A login shell skips what is not a regular file there (a FIFO held it until its timeout).
        let login = sb.run("echo alive", &opts()).await;
        assert_eq!(login.map(|r| r.stdout).map_err(|e| e.to_string()), Ok("alive\n".to_string()), "{make}");
        sb.set_env_vars(&vars(&[("BACK", "1")]), false).await.unwrap();
        assert_eq!(sb.list_env_vars().await.unwrap(), vars(&[("BACK", "1")]));
    }
    // Commands in flight hold a few descriptors each in the agent: its limit is not the
    // kernel's default of 1024 (about 170 commands at once ran out).
    let limits = sb.run("grep 'open files' /proc/1/limits", &raw).await.unwrap().stdout;
    assert_eq!(limits.split_whitespace().collect::<Vec<_>>()[3..5], ["65536", "65536"], "{limits}");
    sb.delete().await.unwrap();
}

#[test]
fn cli_env_commands_mask_values_and_reject_bad_pairs() {
    let env = env();
    let secret = "sk-live-0123456789abcdef";
    // A secret of the caller's environment that it does not pass on.
    let held = "ghp_held-by-the-caller-only";
    let out = env
        .cli()
        .args(["sandbox", "create", "--name", "clienv", "--env", &format!("OPENAI_API_KEY={secret}"), "--env", "MODE=a=b"])
        .env("CALLERS_TOKEN", held)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The sandbox's processes (its supervisor, QEMU) outlive the caller: they keep none of its
    // environment's secrets.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(vars) = std::fs::read(e.path().join("environ")) {
            assert!(!String::from_utf8_lossy(&vars).contains(held), "the caller's secret in the environment of {:?}", e.path());
        }
    }
    // The secret is nowhere on a host command line (QEMU's, the supervisor's, ours) ...
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            assert!(!String::from_utf8_lossy(&cmd).contains(secret), "secret on the command line of {:?}", e.path());
        }
    }
    // ... nor in the sandbox's logs, nor in info/list output.
    let vmdir = env.leftover_files().pop().unwrap();
    for log in ["console.log", "supervisor.log"] {
        let text = std::fs::read_to_string(vmdir.join(log)).unwrap_or_default();
        assert!(!text.contains(secret), "secret in {log}");
    }
    for args in
        [vec!["sandbox", "info", "clienv", "--json"], vec!["sandbox", "list", "--json"], vec!["sandbox", "env", "list", "clienv", "--json"]]
    {
        let out = env.smolvm(&args);
        assert!(out.status.success());
        assert!(!stdout(&out).contains(secret), "{args:?} shows the secret");
    }
    let out = env.smolvm(&["sandbox", "env", "list", "clienv"]);
    assert_eq!(stdout(&out), "MODE=****\nOPENAI_API_KEY=****\n");
    let out = env.smolvm(&["sandbox", "env", "list", "clienv", "--show-values"]);
    assert_eq!(stdout(&out), format!("MODE=a=b\nOPENAI_API_KEY={secret}\n"));

    let out = env.smolvm(&["sandbox", "env", "set", "clienv", "APP_MODE=dev", "DEBUG=1"]);
    assert_eq!(stdout(&out), "APP_MODE\nDEBUG\nMODE\nOPENAI_API_KEY\n");
    let out = env.smolvm(&["sandbox", "exec", "clienv", "--", "echo APP_MODE=$APP_MODE DEBUG=$DEBUG"]);
    assert_eq!(stdout(&out), "APP_MODE=dev DEBUG=1\n");
    let out = env.smolvm(&["sandbox", "env", "unset", "clienv", "DEBUG", "NOPE", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["data"]["removed"], serde_json::json!(["DEBUG"]));
    assert_eq!(v["ok"], true);
    // A bare KEY takes the host's value here too, keeping it off command lines.
    let out = env.cli().args(["sandbox", "env", "set", "clienv", "TOKEN"]).env("TOKEN", "from the host").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out =
        env.cli().args(["sandbox", "exec", "clienv", "-e", "ONCE", "--", "echo $TOKEN/$ONCE"]).env("ONCE", "just once").output().unwrap();
    assert_eq!(stdout(&out), "from the host/just once\n");
    assert!(env.smolvm(&["sandbox", "env", "unset", "clienv", "TOKEN"]).status.success());

    for (pair, message) in [
        ("NOEQUALS", "invalid env: malformed pair (expected KEY=VALUE); a KEY alone must name a variable set on this host"),
        ("=v", "empty key in pair"),
        ("MY-VAR=1", "Invalid environment variable key: 'MY-VAR'"),
    ] {
        let out = env.smolvm(&["sandbox", "env", "set", "clienv", pair]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains(message), "{pair}: {}", stderr(&out));
        let out = env.smolvm(&["sandbox", "env", "set", "clienv", pair, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], "validation");
    }
    // Of several, the one at fault is said by its place (its text could be a secret).
    let out = env.smolvm(&["sandbox", "env", "set", "clienv", "A=1", "NOT_SET_ON_THIS_HOST", "B=2"]);
    assert_eq!(
        stderr(&out).lines().next(),
        Some("error: invalid env: malformed pair (expected KEY=VALUE): pair number 2 of 3; a KEY alone must name a variable set on this host")
    );
    // A stopped sandbox starts again with the variables it had.
    assert!(env.smolvm(&["sandbox", "stop", "clienv"]).status.success());
    assert!(env.smolvm(&["sandbox", "start", "clienv"]).status.success());
    let out = env.smolvm(&["sandbox", "exec", "clienv", "--", "echo $APP_MODE $MODE"]);
    assert_eq!(stdout(&out), "dev a=b\n");
    assert!(env.smolvm(&["sandbox", "delete", "--force", "clienv"]).status.success());

    // `smolvm run --env`.
    let out = env.smolvm(&["run", "--env", "GREETING=hello there", "echo $GREETING"]);
    assert_eq!(stdout(&out), "hello there\n");
    // The command's own variable too: a raw shell (which reads no profile) sees it.
    let out = env.smolvm(&["run", "--shell", "raw", "--env", "MODE=ci", "echo $MODE"]);
    assert_eq!(stdout(&out), "ci\n");
    // `--env KEY` takes the host's value, which then appears on no command line.
    let out = env.cli().args(["run", "--env", "FROM_HOST", "echo $FROM_HOST"]).env("FROM_HOST", "host value").output().unwrap();
    assert_eq!(stdout(&out), "host value\n");
    let out = env.cli().args(["run", "--env", "NOT_SET_ANYWHERE", "true"]).env_remove("NOT_SET_ANYWHERE").output().unwrap();
    assert!(stderr(&out).contains("malformed pair (expected KEY=VALUE)"), "{}", stderr(&out));
    // Values are text: one that is not UTF-8 is named as such (by its key, never its value).
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"a\xffb");
        let out = env.cli().args(["run", "--env", "NOT_TEXT", "true"]).env("NOT_TEXT", bad).output().unwrap();
        assert_eq!(stderr(&out), "error: invalid env: the value of NOT_TEXT is not UTF-8 text (variables hold text)\n");
        let out = env.cli().arg("run").arg("--env").arg(std::ffi::OsStr::from_bytes(b"NOT_TEXT=\xff")).arg("true").output().unwrap();
        assert_eq!(stderr(&out), "error: invalid env: the value of NOT_TEXT is not UTF-8 text (variables hold text)\n");
    }
    // Several words are quoted word by word; one argument is a shell command as written.
    let out = env.smolvm(&["run", "printf", "[%s]", "a b", "$HOME"]);
    assert_eq!(stdout(&out), "[a b][$HOME]");
}

#[test]
fn host_variables_backend_and_verbose_boot() {
    let env = env();
    let out = env.cli().args(["run", "echo ok"]).env("SMOLVM_BACKEND", "qemu").output().unwrap();
    assert_eq!(stdout(&out), "ok\n");
    let out = env.cli().args(["run", "echo ok"]).env("SMOLVM_BACKEND", "auto").output().unwrap();
    assert_eq!(stdout(&out), "ok\n");
    let out = env.cli().args(["run", "true"]).env("SMOLVM_BACKEND", "bogus").output().unwrap();
    assert!(stderr(&out).contains("invalid SMOLVM_BACKEND: \"bogus\""), "{}", stderr(&out));
    // Quiet by default: the kernel's log is not shown ...
    let out = env.smolvm(&["run", "echo ok"]);
    assert!(!stderr(&out).contains("Linux version"), "{}", stderr(&out));
    // ... and with SMOLVM_VERBOSE_BOOT it is, on stderr, while stdout stays the command's.
    for v in ["1", "true", "yes", "on"] {
        let out = env.cli().args(["run", "echo ok"]).env("SMOLVM_VERBOSE_BOOT", v).output().unwrap();
        assert_eq!(stdout(&out), "ok\n");
        assert!(stderr(&out).contains("Linux version"), "{v}: {}", stderr(&out));
    }
}

#[test]
fn use_published_chooses_between_a_ready_image_and_a_local_build() {
    let env = env();
    // A fresh image cache that already has the kernel (and busybox), and a "published" source
    // that has the initramfs: with SMOLVM_USE_PUBLISHED on it is taken from there, with 0 it is
    // built here.
    let images = env.tmp.path().join("images");
    let source = env.tmp.path().join("published");
    std::fs::create_dir_all(&images).unwrap();
    let shared = shared_images();
    let built = env.cli().args(["image", "build", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    let kernel = std::path::PathBuf::from(v["data"]["kernel"].as_str().unwrap());
    let initrd = std::path::PathBuf::from(v["data"]["initrd"].as_str().unwrap());
    let kdir = kernel.parent().unwrap().strip_prefix(&shared).unwrap().to_path_buf();
    let idir = initrd.parent().unwrap().strip_prefix(&shared).unwrap().to_path_buf();
    std::fs::create_dir_all(images.join(&kdir)).unwrap();
    std::fs::copy(&kernel, images.join(&kdir).join("vmlinux")).unwrap();
    // And the musl busybox with its source (a fetch and a build take half a minute).
    for entry in std::fs::read_dir(&shared).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "sources" || (name.starts_with("busybox-") && entry.path().join("busybox").is_file()) {
            std::fs::create_dir_all(images.join(&name)).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap().flatten() {
                std::fs::copy(f.path(), images.join(&name).join(f.file_name())).unwrap();
            }
        }
    }
    std::fs::create_dir_all(source.join(&idir)).unwrap();
    std::fs::copy(&initrd, source.join(&idir).join("initramfs.cpio")).unwrap();
    let build = |published: &str| {
        let out = env
            .cli()
            .args(["image", "build"])
            .env("SMOLVM_IMAGE_DIR", &images)
            .env("SMOLVM_IMAGE_SOURCE", &source)
            .env("SMOLVM_USE_PUBLISHED", published)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    build("1");
    assert!(images.join(&idir).join(".published").exists(), "the published initramfs was not used");
    for off in ["0", "false", "no"] {
        build(off);
        assert!(!images.join(&idir).join(".published").exists(), "SMOLVM_USE_PUBLISHED={off} still used the published image");
        assert_eq!(std::fs::read(images.join(&idir).join("initramfs.cpio")).unwrap(), std::fs::read(&initrd).unwrap());
        build("1");
        // A local build stays in the cache; nothing is fetched over it.
        assert!(!images.join(&idir).join(".published").exists());
        std::fs::remove_dir_all(images.join(&idir)).unwrap();
        build("1");
    }
    // What a builder that died left (an interrupted kernel build: 1.5 GB) goes with the next
    // build that takes the cache's lock.
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let leftover = images.join(format!(".build-kernel-{dead}"));
    std::fs::create_dir_all(leftover.join("linux-source-6.1")).unwrap();
    build("0");
    assert!(!leftover.exists(), "a dead builder's directory was left");
    // `image list` is in name order.
    let out = env.cli().args(["image", "list", "--json"]).env("SMOLVM_IMAGE_DIR", &images).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["data"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert!(names.len() > 2 && names == sorted, "{names:?}");
}

/// Where busybox's source cannot be fetched (here: a mirror that refuses connections), images
/// fall back to Debian's busybox-static, say so once and record it: the next start does not
/// wait for the network again, `doctor` warns with the reason, and `image prune` clears the
/// record so that the next build tries again.
#[test]
fn an_unfetchable_busybox_source_falls_back_once_until_prune() {
    let env = env();
    let images = env.tmp.path().join("offline-images");
    let shared = shared_images();
    let built = env.cli().args(["image", "build", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    let kernel = std::path::PathBuf::from(v["data"]["kernel"].as_str().unwrap());
    let kdir = images.join(kernel.parent().unwrap().strip_prefix(&shared).unwrap());
    std::fs::create_dir_all(&kdir).unwrap();
    std::fs::copy(&kernel, kdir.join("vmlinux")).unwrap();
    let smolvm = |args: &[&str]| {
        let out = env
            .cli()
            .args(args)
            .env("SMOLVM_IMAGE_DIR", &images)
            .env("SMOLVM_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
            .output()
            .unwrap();
        assert!(out.status.success() || args[0] == "doctor", "{args:?}: {}", stderr(&out));
        out
    };
    let out = smolvm(&["image", "build"]);
    let err = stderr(&out);
    assert!(err.contains("using Debian's busybox-static"), "{err}");
    assert!(err.contains("could not download the source index from http://127.0.0.1:9/debian"), "{err}");
    assert!(images.join("busybox-fetch-failed/build-failed").is_file());
    // The fetch's temporary directory is gone.
    assert!(std::fs::read_dir(&images).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().starts_with(".fetch-")));
    let err = stderr(&smolvm(&["image", "build"]));
    assert!(!err.contains("fetching") && !err.contains("busybox-static"), "tried again: {err}");
    let doctor: serde_json::Value = serde_json::from_slice(&smolvm(&["doctor", "--json"]).stdout).unwrap();
    let check = doctor["data"].as_array().unwrap().iter().find(|c| c["name"] == "busybox-musl").expect("a busybox-musl check").clone();
    assert_eq!(check["status"], "warn", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("could not download the source index"), "{check}");
    smolvm(&["image", "prune"]);
    assert!(!images.join("busybox-fetch-failed").exists());
    let err = stderr(&smolvm(&["image", "build"]));
    assert!(err.contains("fetching Debian's busybox source package"), "{err}");
}

#[test]
fn doctor_reports_each_check_and_fails_on_an_invalid_setting() {
    let env = env();
    let doctor = |extra: &[(&str, &str)]| {
        let mut c = env.cli();
        for (k, v) in extra {
            c.env(k, v);
        }
        let out = c.args(["doctor", "--json"]).output().unwrap();
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    };
    let (code, v) = doctor(&[]);
    let checks = v["data"].as_array().unwrap();
    let check = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no {name} check: {v}")).clone();
    for name in
        ["accelerator", "backend", "qemu", "kernel", "busybox", "agent", "machine", "agent-transport", "tun", "nftables", "data_dir"]
    {
        let c = check(name);
        assert!(["ok", "warn"].contains(&c["status"].as_str().unwrap()), "{c}");
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
    }
    // KVM here or not, the accelerator check says which and, under TCG, why.
    let accel = check("accelerator");
    assert!(accel["detail"] == "KVM" || accel["detail"].as_str().unwrap().starts_with("TCG software emulation: "), "{accel}");
    assert_eq!(check("machine")["detail"], "microvm");
    assert_eq!(code, Some(0));
    // TCG asked for: that is the reason given, and unsetting it the way back.
    let (_, v) = doctor(&[("SMOLVM_ACCEL", "tcg")]);
    let accel = v["data"].as_array().unwrap().iter().find(|c| c["name"] == "accelerator").unwrap().clone();
    assert_eq!(accel["detail"], "TCG software emulation: SMOLVM_ACCEL=tcg", "{accel}");
    assert!(accel["fix"].as_str().unwrap().contains("unset SMOLVM_ACCEL"), "{accel}");
    // A setting that cannot work fails its check, with the way out, and doctor exits 1.
    let (code, v) =
        doctor(&[("SMOLVM_MACHINE", "pc"), ("SMOLVM_ACCEL", "fast"), ("SMOLVM_BACKEND", "firecracker"), ("SMOLVM_KERNEL", "bogus")]);
    assert_eq!(code, Some(1));
    let failed: Vec<&serde_json::Value> = v["data"].as_array().unwrap().iter().filter(|c| c["status"] == "fail").collect();
    assert_eq!(
        failed.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(),
        ["accelerator", "backend", "kernel", "machine"],
        "{v}"
    );
    // The envelope's error names them, as every failed command's does.
    assert_eq!(v["error"]["code"], "host", "{v}");
    assert_eq!(v["error"]["message"], "failed checks: accelerator, backend, kernel, machine (each says what to do)", "{v}");
    for (c, unset) in failed.iter().zip(["SMOLVM_ACCEL", "SMOLVM_BACKEND", "SMOLVM_KERNEL"]) {
        assert!(c["fix"].as_str().unwrap().starts_with(&format!("unset {unset}")), "{c}");
    }
    assert_eq!(failed[3]["fix"], "set SMOLVM_MACHINE to microvm, q35 or auto", "{}", failed[3]);
    // A data directory on a read-only mount fails its check, saying so (it passed, and every
    // command then failed).
    let ro = env.tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "ro,size=1M", "tmpfs"]).arg(&ro).status().unwrap();
    assert!(mounted.success());
    let unmount = Unmount(ro.clone());
    let (code, v) = doctor(&[("SMOLVM_DATA_DIR", ro.join("data").to_str().unwrap())]);
    drop(unmount);
    let data_dir = v["data"].as_array().unwrap().iter().find(|c| c["name"] == "data_dir").unwrap().clone();
    assert_eq!(code, Some(1));
    assert_eq!(data_dir["status"], "fail", "{data_dir}");
    assert!(data_dir["detail"].as_str().unwrap().ends_with("cannot be written: Read-only file system (os error 30)"), "{data_dir}");
    // Debian's kernel asked for is the one doctor names; a bad choice fails every start, named.
    let (_, v) = doctor(&[("SMOLVM_KERNEL", " Debian ")]);
    let kernel = v["data"].as_array().unwrap().iter().find(|c| c["name"] == "kernel").unwrap().clone();
    assert!(kernel["detail"].as_str().unwrap().starts_with("Debian's prebuilt cloud kernel"), "{kernel}");
    for (var, value, said) in [
        ("SMOLVM_KERNEL", "bogus", "invalid SMOLVM_KERNEL: \"bogus\" is not a kernel choice (allowed: debian, auto)"),
        ("SMOLVM_BACKEND", "bogus", "invalid SMOLVM_BACKEND: \"bogus\" is not a backend (allowed: firecracker, qemu, auto)"),
    ] {
        let out = env.cli().env(var, value).args(["run", "true"]).output().unwrap();
        assert_eq!((out.status.code(), stderr(&out).lines().next().unwrap_or_default()), (Some(1), format!("error: {said}").as_str()));
    }
    // Spaces around a value are no error, as for the other settings.
    let out = env.cli().env("SMOLVM_ACCEL", " tcg ").env("SMOLVM_BACKEND", " qemu").args(["run", "echo spaced"]).output().unwrap();
    assert_eq!(stdout(&out), "spaced\n", "{}", stderr(&out));
    assert!(env.qemu_processes().is_empty() && env.leftover_files().is_empty());
}

/// A root disk keeps the guest's env file from one run to the next: a variable unset while the
/// sandbox was stopped must not come back from that file at its next start.
#[tokio::test]
async fn variables_unset_while_stopped_do_not_come_back_from_a_root_disk() {
    let env = env();
    let rootfs = smolvm::image::default_rootfs(&env.dirs).unwrap();
    let config = VmConfig { rootfs_path: Some(rootfs), env_vars: vars(&[("API_KEY", "s3cret")]), ..Default::default() };
    let mut sb = env.boot(config).await;
    assert_eq!(sb.run("echo \"[$API_KEY]\"", &opts()).await.unwrap().output(), "[s3cret]");
    sb.stop(Duration::from_secs(10)).await.unwrap();
    assert_eq!(sb.unset_env_vars(&["API_KEY".into()]).await.unwrap(), vars(&[("API_KEY", "s3cret")]));
    sb.start(Duration::from_secs(60), &|_| {}).await.unwrap();
    let seen = sb.run("echo \"[$API_KEY]\"; cat /etc/profile.d/smolvm_env.sh 2>/dev/null | grep -c s3cret", &opts()).await.unwrap();
    assert_eq!(seen.stdout, "[]\n0\n");
    assert_eq!(sb.list_env_vars().await.unwrap(), BTreeMap::new());
    sb.delete().await.unwrap();
}

/// Changes to a running sandbox's variables from many processes at once all stick. Each
/// changed the guest, then wrote the guest's whole set to the record: a change made between
/// another's two steps was overwritten there (an unset variable came back at the next start).
/// They now take the sandbox's env lock, one at a time.
#[test]
fn concurrent_changes_to_a_running_sandboxs_variables_all_reach_its_record() {
    let env = env();
    assert!(env.smolvm(&["sandbox", "create", "--name", "many", "--network", "none", "--env", "GONE=1"]).status.success());
    let mut children: Vec<std::process::Child> =
        (0..8).map(|i| env.cli().args(["sandbox", "env", "set", "many", &format!("K{i}={i}")]).spawn().unwrap()).collect();
    children.push(env.cli().args(["sandbox", "env", "unset", "many", "GONE"]).spawn().unwrap());
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    // A change waits for whoever holds the lock.
    let lock = std::fs::File::open(smolvm::sandbox::SandboxPaths::new(&env.dirs, "many").env_lock).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let mut late = env.cli().args(["sandbox", "env", "set", "many", "K8=8"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(late.try_wait().unwrap().is_none(), "a change did not wait for the sandbox's lock");
    drop(held);
    assert!(late.wait().unwrap().success());
    assert!(env.smolvm(&["sandbox", "stop", "many"]).status.success());
    // Stopped: the record's set.
    let out = stdout(&env.smolvm(&["sandbox", "env", "list", "many"]));
    assert_eq!(out, (0..9).map(|i| format!("K{i}=****\n")).collect::<String>());
    assert!(env.smolvm(&["sandbox", "delete", "many"]).status.success());
}

/// A build whose process dies takes the programs it runs with it: killed (`kill -9`, a Python
/// program that exits after a Ctrl-C), it left the kernel source's unpacking, then its `make`,
/// running for minutes into a directory the next build removes.
#[test]
fn a_build_whose_process_dies_takes_its_programs_with_it() {
    let env = env();
    let images = env.tmp.path().join("killed-images");
    let mut build =
        env.cli().args(["image", "build"]).env("SMOLVM_IMAGE_DIR", &images).stderr(std::process::Stdio::null()).spawn().unwrap();
    let dir = images.join(format!(".build-kernel-{}", build.id()));
    let dir = dir.to_string_lossy().into_owned();
    let unpacking = wait_until(Duration::from_secs(30), || !processes_mentioning("tar", &dir).is_empty());
    assert!(unpacking, "the kernel build never started unpacking its source");
    build.kill().unwrap();
    build.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || processes_mentioning("tar", &dir).is_empty());
    assert!(gone, "the build's tar ran on after it: {:?}", processes_mentioning("tar", &dir));
}
