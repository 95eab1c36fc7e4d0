use smolvm::{Dirs, RunOptions, Sandbox, VmConfig};
use std::time::{Duration, Instant};
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut sb = Sandbox::create_in(Dirs::from_env(), VmConfig::default(), true).unwrap();
    sb.start(Duration::from_secs(30), &|_| {}).await.unwrap();
    let opts = RunOptions { timeout: Duration::from_secs(10), ..Default::default() };
    for _ in 0..20 {
        sb.run("true", &opts).await.unwrap();
    }
    let mut v = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        sb.run("true", &opts).await.unwrap();
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("run(true) p50 {:.2} ms p90 {:.2} ms", v[150], v[270]);
    sb.delete().await.unwrap();
}
