//! The README's Rust library example, kept compiling and run by the tests (`readme.rs`).

use smolvm::{RunOptions, Sandbox, VmConfig};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> smolvm::Result<()> {
    let config = VmConfig {
        vm_id: Some("demo".into()),
        memory: 512,
        env_vars: BTreeMap::from([("APP_MODE".to_string(), "production".to_string())]),
        ..Default::default()
    };

    // Record the sandbox (state `created`), then boot it.
    let mut sb = Sandbox::create(config)?;
    sb.start(Duration::from_secs(30), &|line: &str| eprintln!("{line}")).await?;

    let r = sb.run("echo $APP_MODE", &RunOptions::default()).await?;
    assert_eq!(r.output(), "production");

    // Returns the sorted names present afterwards.
    let names = sb.set_env_vars(&BTreeMap::from([("DEBUG".to_string(), "1".to_string())]), true).await?;
    assert_eq!(names, ["APP_MODE", "DEBUG"]);

    // Stops the VM if it runs, then removes the sandbox and its files.
    sb.delete().await?;
    Ok(())
}
