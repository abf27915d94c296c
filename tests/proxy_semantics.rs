//! What a webhook receiver relies on: bytes, query strings and headers
//! arrive as sent; forwarding headers and request ids are set.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use rand::RngCore;
use ring::hmac;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn one_pool() -> (TestBackend, TestBackend, ProxyProcess) {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let proxy = ProxyProcess::start(&blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH)).await;
    (blue, green, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_random_body_arrives_unchanged() {
    let (blue, _green, proxy) = one_pool().await;
    let mut body = vec![0u8; 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut body);
    let mut client = Client::connect(proxy.http).await.unwrap();
    let request = Request::post("/upload")
        .header("host", "app.test")
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let reply = client.send(request).await.unwrap();
    assert_eq!(reply.status, 200);
    let received = blue.requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body.len(), body.len());
    assert!(received[0].body == body, "body bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhook_post_verifies_at_backend() {
    let (blue, _green, proxy) = one_pool().await;
    let secret = b"app-secret";
    let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"value":{"messages":[{"text":{"body":"Hola \u00e9 \ud83d\ude00"}}]}}]}]}"#;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let signature = format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()));
    let mut client = Client::connect(proxy.http).await.unwrap();
    let request = Request::post("/webhook")
        .header("host", "app.test")
        .header("content-type", "application/json")
        .header("x-hub-signature-256", &signature)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    assert_eq!(client.send(request).await.unwrap().status, 200);
    let received = &blue.requests()[0];
    assert_eq!(received.body, body.to_vec());
    assert_eq!(
        received.header("x-hub-signature-256").as_deref(),
        Some(signature.as_str())
    );
    let expected = hex::encode(hmac::sign(&key, &received.body).as_ref());
    assert_eq!(signature, format!("sha256={expected}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_get_query_is_byte_exact() {
    let (blue, _green, proxy) = one_pool().await;
    let target = "/webhook?hub.mode=subscribe&hub.verify_token=t%2Fok+en%20x&hub.challenge=1158201444&q=%E2%9C%93&raw=a%2Fb%2fc+d";
    let request = format!("GET {target} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(blue.requests()[0].target, target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_replaced_for_untrusted_peer() {
    let (blue, _green, proxy) = one_pool().await;
    let request = "GET /x HTTP/1.1\r\nHost: Api.Example.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nForwarded: for=6.6.6.6\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let got = &blue.requests()[0];
    assert_eq!(got.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        got.header("x-forwarded-host").as_deref(),
        Some("Api.Example.com")
    );
    assert_eq!(got.header("host").as_deref(), Some("Api.Example.com"));
    assert!(got.header("forwarded").is_none());
    assert_eq!(got.header_count("x-forwarded-for"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peer_chain_is_appended() {
    let blue = TestBackend::start("blue").await;
    let green = TestBackend::start("green").await;
    let config = format!(
        "{}\n",
        blue_green(&[&blue], &[&green], (100, 0), FAST_HEALTH).replace(
            "[proxy]\n",
            "[proxy]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"
        )
    );
    let proxy = ProxyProcess::start(&config).await;
    let request = "GET /x HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let got = &blue.requests()[0];
    assert_eq!(
        got.header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_kept_generated_and_echoed() {
    let (blue, _green, proxy) = one_pool().await;
    let kept = raw_exchange(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-123\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        kept.to_ascii_lowercase()
            .contains("x-request-id: abc-123\r\n"),
        "{kept}"
    );
    assert_eq!(
        blue.requests()[0].header("x-request-id").as_deref(),
        Some("abc-123")
    );

    let generated = raw_exchange(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: bad id <script>\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let sent_upstream = blue.requests()[1].header("x-request-id").unwrap();
    assert_eq!(sent_upstream.len(), 32);
    assert!(sent_upstream.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(generated.contains(&sent_upstream), "{generated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_removed_both_ways() {
    let (blue, _green, proxy) = one_pool().await;
    let request = "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-client-hop\r\nX-Client-Hop: 1\r\nKeep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\r\n";
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(2)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let got = &blue.requests()[0];
    for name in ["x-client-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(got.header(name).is_none(), "{name} reached the backend");
    }
    let lower = response.to_ascii_lowercase();
    assert!(!lower.contains("x-backend-secret"), "{response}");
    assert!(!lower.contains("keep-alive: timeout"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_404() {
    let blue = TestBackend::start("blue").await;
    let config = format!(
        "[[routes]]\nname = \"only\"\nhosts = [\"api.test\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [\"{}\"]\n",
        blue.addr
    );
    let proxy = ProxyProcess::start(&config).await;
    assert_eq!(get(proxy.http, "api.test", "/").await.unwrap().status, 200);
    assert_eq!(
        get(proxy.http, "other.test", "/").await.unwrap().status,
        404
    );
}

/// Requests a client sends before the previous response (RFC 9112 section
/// 9.3.2) get their responses in order on the same connection, and each
/// pipelined request gets the same framing checks as a first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_served_in_order() {
    let (blue, _green, proxy) = one_pool().await;
    let burst = concat!(
        "GET /one HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        "GET /three?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let response = raw_exchange(proxy.http, burst.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 4, "{response}");
    let seen: Vec<(String, Vec<u8>)> = blue
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.body.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("/one".to_string(), Vec::new()),
            ("/two".to_string(), b"hello".to_vec()),
            ("/three?x=1".to_string(), Vec::new()),
            ("/four".to_string(), Vec::new()),
        ]
    );

    // A pipelined request with ambiguous framing is rejected, and never
    // reaches the backend, after the first one gets its response.
    let smuggle = concat!(
        "GET /five HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /six HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    let response = raw_exchange(proxy.http, smuggle.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("HTTP/1.1 400"), "{response}");
    let targets: Vec<String> = blue.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets.last().map(String::as_str), Some("/five"));
}

/// An absolute-form target reaches the backend in origin-form. A target
/// whose authority differs from `Host` (Pingora checks that), another
/// scheme, or a raw non-ASCII byte in a target is rejected before it
/// reaches a backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_becomes_origin_form() {
    let (blue, _green, proxy) = one_pool().await;
    let request = concat!(
        "POST http://hooks.example/webhook?hub.mode=a%2Fb+c HTTP/1.1\r\n",
        "Host: hooks.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = blue.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/webhook?hub.mode=a%2Fb+c");
    assert_eq!(seen[0].header("host").as_deref(), Some("hooks.example"));
    assert_eq!(seen[0].body, b"{}");

    let other_scheme =
        "GET ftp://hooks.example/x HTTP/1.1\r\nHost: hooks.example\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(proxy.http, other_scheme.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    let mismatch =
        "GET http://hooks.example/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(proxy.http, mismatch.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");

    let raw = b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(proxy.http, raw, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(
        blue.requests().len(),
        1,
        "the raw target reached the backend"
    );
}

/// Starts a backend that responds to each request with its path, after
/// 400 ms for `/slow` paths, and records the POST request lines, and a
/// proxy in front of it.
async fn slow_backend() -> (RawBackend, Arc<Mutex<Vec<String>>>, ProxyProcess) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&seen);
    let backend = RawBackend::start(move |mut stream, _| {
        let log = Arc::clone(&log);
        async move {
            while let Some((head, _)) = read_request(&mut stream).await {
                let line = head.lines().next().unwrap_or("").to_string();
                if line.starts_with("POST") {
                    log.lock().unwrap().push(line.clone());
                }
                if line.contains("/slow") {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                    path.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = ProxyProcess::start(&format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [\"{}\"]\n",
        backend.addr
    ))
    .await;
    (backend, seen, proxy)
}

/// Writes `parts` to a new connection, pausing 100 ms between them, then
/// half-closes when `half_close` is set, and reads until the proxy closes.
async fn exchange_in_parts(proxy: &ProxyProcess, parts: &[&[u8]], half_close: bool) -> String {
    let mut client = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client.write_all(part).await.unwrap();
    }
    if half_close {
        client.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A request that arrives while the one before it is still at the backend
/// waits for it: both are answered in order, each reaches the backend
/// once, and the first is not failed because the second came early. The
/// same holds for a first request offering `Upgrade: h2c`, as curl does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_during_slow_request_waits() {
    let (_backend, seen, proxy) = slow_backend().await;
    let firsts: [&[u8]; 2] = [
        b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /slow-h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 2\r\n\r\n{}",
    ];
    for first in firsts {
        seen.lock().unwrap().clear();
        let next =
            b"POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let response = exchange_in_parts(&proxy, &[first, next], false).await;
        assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "{response}");
        let slow = response.find("/slow");
        let after = response.find("/next");
        assert!(slow.is_some(), "{response}");
        assert!(slow < after, "{response}");
        let lines = seen.lock().unwrap().clone();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("POST /slow"), "{lines:?}");
        assert_eq!(lines[1], "POST /next HTTP/1.1");
    }
}

/// A client that sends its requests and then half-closes still gets every
/// response (RFC 9112 section 9.6), so a request the backend processed is
/// never left without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_gets_its_responses() {
    let (_backend, seen, proxy) = slow_backend().await;
    let one = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}";
    let response = exchange_in_parts(&proxy, &[one], true).await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 1, "{response}");

    seen.lock().unwrap().clear();
    let pipelined = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}POST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}";
    let response = exchange_in_parts(&proxy, &[pipelined], true).await;
    assert_eq!(response.matches("HTTP/1.1 200").count(), 2, "{response}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["POST /slow HTTP/1.1", "POST /next HTTP/1.1"]
    );
}
