//! `switchyard demo`: the proxy in front of two built-in backends, blue and
//! green, on loopback, with no setup and no root.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Listener addresses of the demo, each changeable by a flag.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: Option<PathBuf>,
}

/// Starts the blue and green backends on a thread of their own and returns
/// their addresses once both listen.
pub fn start_backends() -> std::io::Result<(SocketAddr, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (blue, green) = runtime.block_on(async {
        let blue = TcpListener::bind("127.0.0.1:0").await?;
        let green = TcpListener::bind("127.0.0.1:0").await?;
        Ok::<_, std::io::Error>((blue, green))
    })?;
    let addresses = (blue.local_addr()?, green.local_addr()?);
    std::thread::Builder::new()
        .name("demo-backends".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::join!(serve_backend(blue, "blue"), serve_backend(green, "green"));
            })
        })?;
    Ok(addresses)
}

/// Serves a demo backend: `/health` returns 200 "ok"; any other path
/// returns the pool name, with an `x-pool` header naming it too.
pub async fn serve_backend(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| async move {
                let body = if request.uri().path() == "/health" {
                    "ok\n".to_string()
                } else {
                    format!("{name}\n")
                };
                let response = Response::builder()
                    .header("content-type", "text/plain")
                    .header("x-pool", name)
                    .body(Full::new(Bytes::from(body)));
                Ok::<_, Infallible>(response.unwrap_or_default())
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The demo config, with the addresses the demo replaces.
const TEMPLATE: &str = include_str!("../config/demo.toml");

/// Writes the demo config for the given backends and returns its path.
pub fn write_config(
    dir: &Path,
    options: &DemoOptions,
    blue: SocketAddr,
    green: SocketAddr,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = TEMPLATE
        .replace("127.0.0.1:8080", &options.http.to_string())
        .replace("127.0.0.1:8443", &options.https.to_string())
        .replace("127.0.0.1:9901", &options.metrics.to_string())
        .replace("127.0.0.1:18001", &blue.to_string())
        .replace("127.0.0.1:18002", &green.to_string())
        .replace("/tmp/switchyard-demo", &dir.display().to_string());
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The instructions `switchyard demo` prints.
pub fn instructions(options: &DemoOptions, config: &Path) -> String {
    format!(
        "Switchyard demo\n\
         config:   {config}\n\
         \n\
         Try:\n\
         \x20 curl -s http://{http}/          # answers \"blue\" (weights blue=100 green=0)\n\
         \x20 curl -si http://{http}/ | grep -i x-request-id\n\
         \x20 curl -s --http2 --cacert {certs}/localhost.crt https://localhost:{https_port}/\n\
         \n\
         Metrics and health:\n\
         \x20 curl -s http://{metrics}/metrics | grep switchyard_requests_total\n\
         \x20 curl -s http://{metrics}/readyz\n\
         \n\
         Flip and shift traffic over the admin socket {socket}\n\
         (keep a loop running meanwhile: while sleep 0.2; do curl -s http://{http}/; done):\n\
         \x20 switchyard ctl -c {config} status\n\
         \x20 switchyard ctl -c {config} weights demo blue=0 green=100\n\
         \x20 switchyard ctl -c {config} weights demo blue=100 green=0\n\
         \x20 switchyard ctl -c {config} shift demo --to green --step 20 --every 5s --min-requests 5\n\
         \x20 switchyard ctl -c {config} rollback demo\n\
         \n\
         Stop with Ctrl-C.\n",
        config = config.display(),
        http = options.http,
        metrics = options.metrics,
        certs = config
            .parent()
            .unwrap_or(Path::new("."))
            .join("certs")
            .display(),
        https_port = options.https.port(),
        socket = config.with_file_name("admin.sock").display(),
    )
}
