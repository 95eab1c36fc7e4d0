// The smallest HTTP/2 server over one byte stream (a Unix socket stands in for the virtio port):
// what an agent speaking HTTP/2 would carry at the least.
use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/tmp/h2probe.sock".into());
    let _ = std::fs::remove_file(&path);
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    println!("ready");
    let (s, _) = l.accept().await.unwrap();
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(s), service_fn(|_r: Request<hyper::body::Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("pong"))))
        }))
        .await
        .unwrap();
}
