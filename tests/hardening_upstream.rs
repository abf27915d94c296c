//! Backends that misbehave: closed pooled connections, a connection lost
//! after a POST was sent, a reset mid-response, ambiguous response framing,
//! and backends that fail until passive health ejects them.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn one_backend(addr: std::net::SocketAddr, proxy_extra: &str) -> String {
    format!(
        "[proxy]\n{proxy_extra}\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [\"{addr}\"]\n"
    )
}

/// Counts arrivals of each request line.
type Arrivals = Arc<Mutex<HashMap<String, usize>>>;

fn count(arrivals: &Arrivals, head: &str) {
    let line = head.lines().next().unwrap_or_default().to_string();
    *arrivals.lock().unwrap().entry(line).or_default() += 1;
}

fn arrivals_of(arrivals: &Arrivals, line: &str) -> usize {
    arrivals.lock().unwrap().get(line).copied().unwrap_or(0)
}

async fn respond(stream: &mut TcpStream, body: &str) -> bool {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nKeep-Alive: timeout=1\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_idle_pooled_connections_costs_nothing() {
    // The backend closes each connection 200 ms after its last response,
    // like a server with a short keep-alive; the proxy keeps pooled
    // connections longer, so it meets closed ones on reuse.
    let arrivals: Arrivals = Arc::default();
    let seen = Arc::clone(&arrivals);
    let backend = RawBackend::start(move |mut stream, _| {
        let seen = Arc::clone(&seen);
        async move {
            loop {
                let request =
                    tokio::time::timeout(Duration::from_millis(200), read_request(&mut stream))
                        .await;
                let Ok(Some((head, _))) = request else {
                    return;
                };
                count(&seen, &head);
                if !respond(&mut stream, "ok").await {
                    return;
                }
            }
        }
    })
    .await;
    let proxy = ProxyProcess::start(&one_backend(
        backend.addr,
        "upstream_idle_timeout = \"30s\"",
    ))
    .await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    for i in 0..6 {
        let request = if i % 2 == 0 {
            Request::get(format!("/get/{i}"))
        } else {
            Request::post(format!("/post/{i}"))
        }
        .header("host", "a")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
        let reply = client.send(request).await.unwrap();
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for i in 0..6 {
        let line = if i % 2 == 0 {
            format!("GET /get/{i} HTTP/1.1")
        } else {
            format!("POST /post/{i} HTTP/1.1")
        };
        assert_eq!(arrivals_of(&arrivals, &line), 1, "{line}");
    }
    assert!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 6
    );
}

/// A backend that answers the first request on each connection and drops
/// the connection after reading the second one: the reuse race where a
/// server closes a keep-alive connection just as a request arrives.
async fn drop_second_request_backend(arrivals: &Arrivals) -> RawBackend {
    let seen = Arc::clone(arrivals);
    RawBackend::start(move |mut stream, _| {
        let seen = Arc::clone(&seen);
        async move {
            let Some((head, _)) = read_request(&mut stream).await else {
                return;
            };
            count(&seen, &head);
            if !respond(&mut stream, "first").await {
                return;
            }
            if let Some((head, _)) = read_request(&mut stream).await {
                count(&seen, &head);
            }
            // Dropped without an answer.
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_a_dropped_reused_connection_is_retried() {
    let arrivals: Arrivals = Arc::default();
    let backend = drop_second_request_backend(&arrivals).await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "")).await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    assert_eq!(client.get("/warm").await.unwrap().status, 200);
    let reply = client.get("/again").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "first", "the retry used a fresh connection");
    assert_eq!(arrivals_of(&arrivals, "GET /again HTTP/1.1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_that_may_have_arrived_is_never_replayed() {
    let arrivals: Arrivals = Arc::default();
    let backend = drop_second_request_backend(&arrivals).await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "")).await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    assert_eq!(client.get("/warm").await.unwrap().status, 200);
    let request = Request::post("/webhook")
        .header("host", "a")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
        .unwrap();
    let reply = client.send(request).await.unwrap();
    assert_eq!(reply.status, 502, "{}", reply.text());
    // Give a wrongful replay time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(arrivals_of(&arrivals, "POST /webhook HTTP/1.1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_response_is_never_a_complete_body() {
    let backend = RawBackend::start(|mut stream, index| async move {
        if read_request(&mut stream).await.is_none() {
            return;
        }
        let head = if index % 2 == 0 {
            "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
        } else {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
        };
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.flush().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Linger 0 turns the close into a reset.
        let _ = stream.set_zero_linger();
        drop(stream);
    })
    .await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "")).await;
    for case in ["content-length", "chunked"] {
        let result = get(proxy.http, "a", &format!("/{case}")).await;
        match result {
            Err(err) => assert!(!err.is_empty()),
            Ok(reply) => panic!(
                "{case}: a cut response was presented as complete: {} with {} body bytes",
                reply.status,
                reply.body.len()
            ),
        }
        // On the wire: headers may have gone out, but the connection ends
        // before the declared body or the last chunk.
        let raw = raw_exchange(
            proxy.http,
            format!("GET /{case} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(!raw.ends_with("0\r\n\r\n"), "{case}: {raw:?}");
        if let Some((_, body)) = raw.split_once("\r\n\r\n") {
            assert!(body.len() < 1000, "{case}: {raw:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_response_framing_is_a_backend_error() {
    let backend = RawBackend::start(|mut stream, _| async move {
        if let Some((head, _)) = read_request(&mut stream).await {
            let response = if head.starts_with("GET /two-lengths") {
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!"
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    })
    .await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "")).await;
    let reply = get(proxy.http, "a", "/two-lengths").await.unwrap();
    assert_eq!(reply.status, 502);

    // Content-Length with Transfer-Encoding: Pingora reads the body as
    // chunked (RFC 9112 section 6.3) and drops the length; the client gets
    // one framing only, never both.
    let raw = raw_exchange(
        proxy.http,
        b"GET /both HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let head = raw
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        !(head.contains("content-length") && head.contains("transfer-encoding")),
        "{raw:?}"
    );
    assert!(!head.contains("content-length: 100"), "{raw:?}");
}

fn passive_pool(backends: &[&TestBackend], passive: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\n\n[pools.blue]\nbackends = [{list}]\n{FAST_HEALTH}\npassive = {{ {passive} }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_and_returns() {
    let good1 = TestBackend::start("good").await;
    let good2 = TestBackend::start("good").await;
    let bad = TestBackend::start("bad").await;
    bad.set_fail(500);
    let proxy = ProxyProcess::start(&passive_pool(
        &[&good1, &good2, &bad],
        "consecutive_failures = 3, base_ejection = \"1s\", max_ejection = \"10s\"",
    ))
    .await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    let mut failures = 0;
    for _ in 0..30 {
        if client.get("/").await.unwrap().status == 500 {
            failures += 1;
        }
    }
    // Round robin over three: the bad one answers every third request
    // until its third failure ejects it.
    assert_eq!(failures, 3, "{}", proxy.logs());
    assert_eq!(bad.hits(), 3);
    assert!(proxy.logs().contains("backend ejected by passive health"));

    // The ejection ends after 1 s; the active check still passes, so it is
    // back, fails 3 more and is ejected for twice as long.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for _ in 0..30 {
        client.get("/").await.unwrap();
    }
    assert_eq!(bad.hits(), 6);
    assert!(
        proxy.plain_logs().contains("ejection_ms=2000"),
        "{}",
        proxy.plain_logs()
    );

    // Fixed, it serves again after the ejection.
    bad.set_fail(0);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for _ in 0..30 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert!(bad.hits() > 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_cap_keeps_half_the_pool() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    a.set_fail(503);
    b.set_fail(503);
    let proxy = ProxyProcess::start(&passive_pool(
        &[&a, &b],
        "consecutive_failures = 2, base_ejection = \"30s\", max_ejection_share = 0.5",
    ))
    .await;
    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..20 {
        // 503s from the backends are passed through, not turned into 503
        // "no backend": one backend always stays in.
        let reply = client.get("/").await.unwrap();
        assert_eq!(reply.status, 503);
        assert!(
            reply.header("x-pool").is_some(),
            "the proxy found no backend"
        );
    }
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("backend ejected by passive health").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("ejection cap is reached"), "{logs}");
}

/// A signed webhook POST sent while its only backend restarts: no backend
/// has received it, so it waits for the backend to come back instead of
/// failing, and arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_outlives_a_backend_restart() {
    let backend = TestBackend::start("blue").await;
    let addr = backend.addr;
    let proxy = ProxyProcess::start(&one_backend(addr, "no_backend_wait = \"3s\"")).await;
    assert_eq!(get(proxy.http, "a", "/warm").await.unwrap().status, 200);
    backend.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the killed backend still accepts"
    );

    let restarted = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        TestBackend::serve(listener, "blue")
    });
    let started = std::time::Instant::now();
    let mut client = Client::connect(proxy.http).await.unwrap();
    let request = Request::post("/webhook")
        .header("host", "a")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"entry\":[]}")))
        .unwrap();
    let reply = client.send(request).await.unwrap();
    let waited = started.elapsed();
    let restarted = restarted.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    let posts: Vec<Recorded> = restarted
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].body, b"{\"entry\":[]}");
}

/// A backend that stays down: the request waits `no_backend_wait`, then
/// gets 503 with `Retry-After`, as when no backend is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_waits_then_503() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "no_backend_wait = \"1s\"")).await;
    assert_eq!(get(proxy.http, "a", "/warm").await.unwrap().status, 200);
    backend.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let reply = get(proxy.http, "a", "/").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    assert!(waited >= Duration::from_millis(800), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

/// A backend that takes the request and never answers: 504 once
/// `read_timeout` passes, as nginx answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_gives_504() {
    let backend = RawBackend::start(|mut stream, _| async move {
        if read_request(&mut stream).await.is_some() {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    })
    .await;
    let proxy = ProxyProcess::start(&one_backend(backend.addr, "read_timeout = \"500ms\"")).await;
    let reply = get(proxy.http, "a", "/slow").await.unwrap();
    assert_eq!(reply.status, 504, "{}", reply.text());
}
