//! Client-side limits through the real proxy: slow and idle clients,
//! oversized headers and bodies, ambiguous framing, the connection cap.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One pool, one backend, a route with a small body limit, and `limits`.
fn config(backend: &TestBackend, limits: &str) -> String {
    format!(
        "[limits]\n{limits}\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ blue = 1 }}\nmax_body = \"1KiB\"\n\n[pools.blue]\nbackends = [\"{}\"]\n",
        backend.addr
    )
}

/// Reads until the server closes; returns the bytes and whether it closed
/// within `timeout`.
async fn read_until_close(stream: &mut TcpStream, timeout: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_is_cut_while_others_are_served() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "header_read_timeout = \"1s\"")).await;

    let mut slow = TcpStream::connect(proxy.http).await.unwrap();
    let dribble = tokio::spawn(async move {
        let started = Instant::now();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        // One header byte every 100 ms: each read is quick, the header never ends.
        for byte in b"X-Slow: ".iter().cycle().take(60) {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (response, closed) = read_until_close(&mut slow, Duration::from_secs(3)).await;
        (response, closed, started.elapsed())
    });

    let mut client = Client::connect(proxy.http).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (response, closed, elapsed) = dribble.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(closed, "the slow connection stayed open");
    assert!(
        elapsed < Duration::from_secs(4),
        "cut after {elapsed:?}, not near the 1 s header timeout"
    );
    assert_eq!(backend.hits(), 20, "the slow request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_do_not_starve_new_ones() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "header_read_timeout = \"2s\"")).await;
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(proxy.http).await.unwrap());
    }
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = proxy.http;
        tasks.push(tokio::spawn(async move { get(addr, "a", "/").await }));
    }
    for task in tasks {
        let reply = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a new connection waited behind idle ones")
            .unwrap()
            .unwrap();
        assert_eq!(reply.status, 200);
    }
    // The idle ones never sent a byte: they are closed after the header
    // timeout, silently.
    let (response, closed) = read_until_close(&mut idle[0], Duration::from_secs(4)).await;
    assert!(closed, "an idle connection outlived the header timeout");
    assert_eq!(response, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_is_closed() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "keepalive_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (response, closed) = read_until_close(&mut stream, Duration::from_secs(4)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(closed, "the idle keep-alive connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(
        &backend,
        "max_header_bytes = \"8KiB\"\nmax_header_count = 20",
    ))
    .await;
    let long = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let response = raw_exchange(proxy.http, long.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");

    let many: String = (0..25).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");

    // A header that never ends but keeps growing is cut at the size limit.
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let _ = stream.write_all(&vec![b'x'; 10_000]).await;
    let (response, closed) = read_until_close(&mut stream, Duration::from_secs(4)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert!(closed);

    let fine = get(proxy.http, "a", "/").await.unwrap();
    assert_eq!(fine.status, 200);
    assert_eq!(
        backend.hits(),
        1,
        "an oversized request reached the backend"
    );
}

/// Sends one HTTP/2 request over h2c with curl and returns the status code
/// and the protocol version curl used.
async fn curl_h2c(addr: std::net::SocketAddr, headers: &[String]) -> (String, String) {
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--http2-prior-knowledge", "-o", "/dev/null"]);
    command.args(["-w", "%{http_version} %{http_code}", "--max-time", "10"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command
        .arg(format!("http://a:{}/", addr.port()))
        .arg("--connect-to")
        .arg(format!("a:{}:127.0.0.1:{}", addr.port(), addr.port()))
        .output()
        .await
        .expect("run curl");
    let written = String::from_utf8_lossy(&output.stdout).to_string();
    let (version, status) = written.split_once(' ').unwrap_or(("", ""));
    (version.to_string(), status.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_http2_headers_get_431() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start_rewritten(
        &config(
            &backend,
            "max_header_bytes = \"8KiB\"\nmax_header_count = 20",
        ),
        |text| text.replace("threads = 2\n", "threads = 2\nh2c = true\n"),
    )
    .await;

    let long = vec![format!("X-Long: {}", "a".repeat(9000))];
    assert_eq!(
        curl_h2c(proxy.http, &long).await,
        ("2".into(), "431".into())
    );
    let many: Vec<String> = (0..25).map(|i| format!("X-H{i}: v")).collect();
    assert_eq!(
        curl_h2c(proxy.http, &many).await,
        ("2".into(), "431".into())
    );
    let under = vec![format!("X-Long: {}", "a".repeat(7000))];
    assert_eq!(
        curl_h2c(proxy.http, &under).await,
        ("2".into(), "200".into())
    );
    assert_eq!(
        backend.hits(),
        1,
        "an oversized HTTP/2 request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413_declared_and_chunked() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "")).await;

    let declared = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n{}",
        "a".repeat(5000)
    );
    let response = raw_exchange(proxy.http, declared.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(
        backend.hits(),
        0,
        "a declared oversized body reached the backend"
    );

    // A chunked body declares nothing; it is counted as it streams.
    let mut chunked =
        String::from("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..10 {
        chunked.push_str(&format!("200\r\n{}\r\n", "b".repeat(512)));
    }
    chunked.push_str("0\r\n\r\n");
    let response = raw_exchange(proxy.http, chunked.as_bytes(), Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    // The backend may have seen the request start, but never a complete
    // body over the limit.
    assert!(
        backend.requests().iter().all(|r| r.body.len() <= 1024),
        "an oversized chunked body was delivered"
    );

    // Under the limit, chunked works and arrives intact.
    let mut client = Client::connect(proxy.http).await.unwrap();
    let body = Bytes::from(vec![b'c'; 1000]);
    let request = Request::post("/ok")
        .header("host", "a")
        .header("transfer-encoding", "chunked")
        .body(Full::new(body.clone()))
        .unwrap();
    assert_eq!(client.send(request).await.unwrap().status, 200);
    let delivered = backend.requests();
    assert!(delivered
        .iter()
        .any(|r| r.target == "/ok" && r.body == body.to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_gets_408() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "body_read_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (response, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_gets_400_and_is_never_forwarded() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(&backend, "")).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL and TE",
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "TE and CL",
            format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "differing CL",
            format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 41\r\n\r\nhello{smuggled}"),
        ),
        (
            "CL list",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 7\r\n\r\nhello".to_string(),
        ),
        (
            "TE gzip",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nxx".to_string(),
        ),
        (
            "TE chunked then gzip",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".to_string(),
        ),
        (
            "TE identity",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n".to_string(),
        ),
        (
            "TE with space before colon",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_string(),
        ),
        (
            "TE in HTTP/1.0",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string(),
        ),
        (
            "control byte in value",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n".to_string(),
        ),
        (
            "NUL in value",
            "GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\0b\r\n\r\n".to_string(),
        ),
        (
            "space in header name",
            "GET / HTTP/1.1\r\nHost: a\r\nX Bad: 1\r\n\r\n".to_string(),
        ),
        (
            "bare LF",
            "GET / HTTP/1.1\nHost: a\n\n".to_string(),
        ),
        (
            "folded header",
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n".to_string(),
        ),
        (
            "space in target",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
        ),
        (
            "bad version",
            "GET / HTTP/1.7\r\nHost: a\r\n\r\n".to_string(),
        ),
        (
            "garbage request line",
            "HELLO\r\nHost: a\r\n\r\n".to_string(),
        ),
        (
            "two Hosts",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_string(),
        ),
        (
            "no Host",
            "GET / HTTP/1.1\r\n\r\n".to_string(),
        ),
    ];
    for (name, request) in &cases {
        let started = Instant::now();
        let response = raw_exchange(proxy.http, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{name}: {response:?}");
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{name}: {response:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: the connection was not closed"
        );
    }
    assert_eq!(backend.hits(), 0, "{:?}", backend.requests());
    // The proxy still serves.
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_connection_table_reclaims_idle_keepalive() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(
        &backend,
        "max_connections = 4\nconnection_wait = \"2s\"",
    ))
    .await;
    let mut kept = Vec::new();
    for _ in 0..4 {
        let mut client = Client::connect(proxy.http).await.unwrap();
        assert_eq!(client.get("/").await.unwrap().status, 200);
        kept.push(client);
    }
    // Every slot holds an idle keep-alive connection; a new client gets
    // one of them instead of waiting for the 75 s keep-alive timeout.
    let started = Instant::now();
    let reply = get(proxy.http, "a", "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connection_table_refuses_cleanly() {
    let backend = TestBackend::start("blue").await;
    let proxy = ProxyProcess::start(&config(
        &backend,
        "max_connections = 2\nconnection_wait = \"300ms\"",
    ))
    .await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let addr = proxy.http;
        busy.push(tokio::spawn(
            async move { get(addr, "a", "/sleep/1500").await },
        ));
    }
    assert!(eventually(Duration::from_secs(3), || backend.hits() == 2).await);
    let response = raw_exchange(
        proxy.http,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after: 1"));
    for task in busy {
        assert_eq!(task.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(get(proxy.http, "a", "/").await.unwrap().status, 200);
}
