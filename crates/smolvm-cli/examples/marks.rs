use smolvm::{Dirs, RunOptions, Sandbox, VmConfig};
use std::time::{Duration, Instant};
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dirs = Dirs::from_env();
    let t = Instant::now();
    let cfg = VmConfig { boot_args: std::env::var("MARKS_BOOT_ARGS").ok(), ..VmConfig::default() };
    let mut sb = Sandbox::create_in(dirs, cfg, true).unwrap();
    sb.start(Duration::from_secs(30), &|_| {}).await.unwrap();
    let started = t.elapsed();
    let opts = RunOptions { timeout: Duration::from_secs(10), ..Default::default() };
    sb.run("true", &opts).await.unwrap();
    let ran = t.elapsed();
    let r = sb.run("cat /run/marks", &opts).await.unwrap();
    println!("host: started {:?} first run done {:?}", started, ran);
    print!("{}", r.stdout);
    sb.delete().await.unwrap();
}
