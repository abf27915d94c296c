//! A WebSocket through the HTTPS listener: the upgrade, the echo, and an
//! idle gap longer than Pingora's default 60 s downstream read timeout.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The example key and accept value of RFC 6455 section 1.3.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn start(idle_timeout: &str) -> (TestBackend, tempfile::TempDir, ProxyProcess) {
    let backend = TestBackend::start("ws").await;
    let store = tempfile::tempdir().unwrap();
    TestCert::generate(&["ws.test"]).write(store.path(), "ws");
    let body = format!(
        "[[routes]]\nname = \"ws\"\nhosts = [\"ws.test\"]\nwebsocket_idle_timeout = \"{idle_timeout}\"\npools = {{ main = 100 }}\n\n[pools.main]\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let proxy = ProxyProcess::start_tls("", &body, store.path()).await;
    (backend, store, proxy)
}

/// Sends the upgrade over TLS and returns the stream after the 101 header.
async fn open_websocket(https: SocketAddr) -> TlsStream {
    let (mut stream, handshake) = tls_connect(https, Some("ws.test"), &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(handshake.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let request = format!(
        "GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("101 response timed out")
            .unwrap();
        assert!(n > 0, "closed before the response: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );
    stream
}

/// Writes `message` and reads back exactly as many bytes, within 5 s.
async fn echo(stream: &mut TlsStream, message: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(message).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut back = vec![0u8; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .map_err(|_| "echo timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(back)
}

#[test]
fn accept_key_matches_rfc_example() {
    assert_eq!(websocket_accept(KEY.as_bytes()), ACCEPT);
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_survives_65s_idle() {
    let (backend, _store, proxy) = start("5m").await;
    let mut stream = open_websocket(proxy.https()).await;
    assert_eq!(echo(&mut stream, b"hello").await.unwrap(), b"hello");

    // Longer than Pingora's default downstream read timeout of 60 s.
    tokio::time::sleep(Duration::from_secs(65)).await;
    let message = b"still here after 65 s";
    assert_eq!(
        echo(&mut stream, message).await,
        Ok(message.to_vec()),
        "log:\n{}",
        proxy.logs()
    );

    let requests = backend.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].header("x-forwarded-proto").as_deref(),
        Some("https")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_closed_after_idle_timeout() {
    let (_backend, _store, proxy) = start("2s").await;
    let mut stream = open_websocket(proxy.https()).await;
    assert_eq!(echo(&mut stream, b"hello").await.unwrap(), b"hello");

    // The route's idle timeout, not the 60 s default, ends a quiet
    // connection: the proxy closes it within a few seconds.
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("unexpected {n} bytes: {:?}", &buffer[..n]),
        Err(_) => panic!("still open 10 s after a 2 s idle timeout"),
    }
}
