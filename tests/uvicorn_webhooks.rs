//! Signed webhook deliveries to a real FastAPI app under uvicorn, with its
//! default 5 s keep-alive, across idle gaps longer than that keep-alive:
//! the proxy must never reuse a connection uvicorn is closing, so every
//! delivery succeeds and arrives exactly once.
//!
//! The test builds a virtualenv under Cargo's test temp dir with
//! `pip install fastapi uvicorn` once, and reuses it. Without access to
//! PyPI it prints a loud SKIPPED line and passes.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use ring::hmac;
use support::*;

const SECRET: &[u8] = b"webhook-secret";

const APP: &str = r#"
import hashlib, hmac
from collections import Counter
from fastapi import FastAPI, Header, HTTPException, Request

app = FastAPI()
deliveries = Counter()
SECRET = b"webhook-secret"

@app.get("/health")
def health():
    return {"ok": True}

@app.post("/webhook")
async def webhook(request: Request, x_hub_signature_256: str = Header(...), x_delivery_id: str = Header(...)):
    body = await request.body()
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, x_hub_signature_256):
        raise HTTPException(status_code=401, detail="bad signature")
    deliveries[x_delivery_id] += 1
    return {"received": x_delivery_id}

@app.get("/deliveries")
def counts():
    return dict(deliveries)
"#;

/// Returns the venv's python, creating the venv on first use; `None` when
/// pip cannot reach its index.
fn venv_python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("uvicorn-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if ready.exists() {
        return Some(python);
    }
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(created.success(), "python3 -m venv failed");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "fastapi",
            "uvicorn",
        ])
        .status()
        .expect("pip install");
    if !installed.success() {
        return None;
    }
    std::fs::write(&ready, b"").expect("mark venv ready");
    Some(python)
}

struct Uvicorn {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_uvicorn(python: &Path, dir: &Path) -> Uvicorn {
    std::fs::write(dir.join("hooks.py"), APP).expect("write app");
    let port = free_port();
    // uvicorn's defaults are kept, including --timeout-keep-alive 5.
    let child = Command::new(python)
        .args([
            "-m",
            "uvicorn",
            "hooks:app",
            "--host",
            "127.0.0.1",
            "--port",
        ])
        .arg(port.to_string())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start uvicorn");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = Uvicorn { child, addr };
    let up = eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    assert!(up, "uvicorn did not listen on {addr}");
    server
}

fn signed(id: &str, body: &[u8]) -> Request<Full<Bytes>> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
    let signature = format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()));
    Request::post("/webhook")
        .header("host", "hooks.test")
        .header("content-type", "application/json")
        .header("x-hub-signature-256", signature)
        .header("x-delivery-id", id)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_across_uvicorn_keepalive_gaps_arrive_once() {
    let Some(python) = tokio::task::spawn_blocking(venv_python).await.unwrap() else {
        eprintln!("SKIPPED: pip could not install fastapi and uvicorn (no access to PyPI); the uvicorn keep-alive test did not run");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let app = start_uvicorn(&python, work.path()).await;
    let config = format!(
        "[[routes]]\nname = \"hooks\"\nhosts = [\"hooks.test\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [\"{}\"]\nhealth = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\" }}\n",
        app.addr
    );
    let proxy = ProxyProcess::start(&config).await;

    let mut sent = 0;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(proxy.http).await.unwrap());
    }
    for burst in 0..3 {
        if burst > 0 {
            // Longer than uvicorn's 5 s keep-alive: pooled upstream
            // connections from the last burst are stale by now.
            tokio::time::sleep(Duration::from_millis(5600)).await;
        }
        for i in 0..12 {
            let id = format!("delivery-{burst}-{i}");
            let body = format!("{{\"entry\":[{{\"id\":\"{id}\",\"text\":\"hola \u{e9}\"}}]}}");
            let client = &mut clients[i % 4];
            let reply = match client.send(signed(&id, body.as_bytes())).await {
                Ok(reply) => reply,
                Err(err) => panic!("{id}: the client connection failed: {err}"),
            };
            assert_eq!(reply.status, 200, "{id}: {}", reply.text());
            sent += 1;
        }
    }

    let counts = get(proxy.http, "hooks.test", "/deliveries").await.unwrap();
    assert_eq!(counts.status, 200);
    let counts: serde_json::Value = serde_json::from_slice(&counts.body).unwrap();
    let counts = counts.as_object().expect("a JSON object of counts");
    assert_eq!(counts.len(), sent, "{counts:?}");
    for (id, count) in counts {
        assert_eq!(count.as_u64(), Some(1), "{id} arrived {count} times");
    }
}
