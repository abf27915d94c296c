//! The plain HTTP listener next to HTTPS: the redirect, its per-route
//! opt-out and ACME exception, `X-Forwarded-Proto` and HSTS.

mod support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use support::*;

const HSTS: &str = "max-age=31536000; includeSubDomains";

/// Two routes: `hooks.test` opts out of the redirect, everything else
/// takes the default `plain_http = "redirect"`.
fn routes(backend: &TestBackend) -> String {
    format!(
        "[[routes]]\nname = \"hooks\"\nhosts = [\"hooks.test\"]\nplain_http = true\npools = {{ main = 100 }}\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {{ main = 100 }}\n\n[pools.main]\nbackends = [\"{}\"]\n",
        backend.addr
    )
}

async fn start(tls_keys: &str) -> (TestBackend, tempfile::TempDir, ProxyProcess) {
    let backend = TestBackend::start("app").await;
    let store = tempfile::tempdir().unwrap();
    TestCert::generate(&["app.test", "hooks.test"]).write(store.path(), "site");
    let proxy = ProxyProcess::start_tls(tls_keys, &routes(&backend), store.path()).await;
    (backend, store, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_request_redirects_to_https() {
    let (backend, _store, proxy) = start("").await;
    let port = proxy.https().port();
    let cases = [
        ("app.test", "/", format!("https://app.test:{port}/")),
        (
            "app.test",
            "/a/b?x=1&y=%20z",
            format!("https://app.test:{port}/a/b?x=1&y=%20z"),
        ),
        // The client's port belongs to the plain listener, not to HTTPS.
        (
            "App.Test:8080",
            "/p?q",
            format!("https://app.test:{port}/p?q"),
        ),
    ];
    for (host, target, expected) in cases {
        let reply = get(proxy.http, host, target).await.unwrap();
        assert_eq!(reply.status, 308, "{host}{target}");
        assert_eq!(reply.header("location").as_deref(), Some(&*expected));
        assert_eq!(reply.header("strict-transport-security"), None);
    }

    // 308 keeps the method, so a POST is redirected too and not proxied.
    let mut client = Client::connect(proxy.http).await.unwrap();
    let post = Request::post("/submit?id=7")
        .header("host", "app.test")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let reply = client.send(post).await.unwrap();
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        Some(format!("https://app.test:{port}/submit?id=7"))
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_route_proxied_plain() {
    let (backend, _store, proxy) = start(&format!("hsts = \"{HSTS}\"\n")).await;
    let reply = get(proxy.http, "hooks.test", "/webhook?x=1").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "app");
    assert_eq!(reply.header("strict-transport-security"), None);

    let requests = backend.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].target, "/webhook?x=1");
    assert_eq!(
        requests[0].header("x-forwarded-proto").as_deref(),
        Some("http")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenge_not_redirected() {
    let (backend, _store, proxy) = start("").await;
    for host in ["app.test", "hooks.test"] {
        let reply = get(proxy.http, host, "/.well-known/acme-challenge/x")
            .await
            .unwrap();
        assert_eq!(reply.status, 404, "{host}");
        assert_eq!(reply.header("location"), None);
        assert_eq!(reply.text(), "unknown ACME challenge token");
    }
    // Only the exact challenge prefix is exempt.
    let reply = get(proxy.http, "app.test", "/.well-known/other")
        .await
        .unwrap();
    assert_eq!(reply.status, 308);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sets_proto_and_hsts() {
    let (backend, _store, proxy) = start(&format!("hsts = \"{HSTS}\"\n")).await;
    let (mut client, _) = Client::connect_tls(proxy.https(), "app.test")
        .await
        .unwrap();
    // A client cannot claim a scheme: the proxy writes the one it saw.
    let request = Request::get("/secure")
        .header("host", "app.test")
        .header("x-forwarded-proto", "http")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = client.send(request).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("strict-transport-security").as_deref(),
        Some(HSTS)
    );

    // The opted-out route over TLS is still HTTPS to the backend.
    let reply = client.get_host("hooks.test", "/hook").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("strict-transport-security").as_deref(),
        Some(HSTS)
    );

    let requests = backend.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.header_count("x-forwarded-proto"), 1);
        assert_eq!(
            request.header("x-forwarded-proto").as_deref(),
            Some("https"),
            "{}",
            request.target
        );
    }

    // HTTP/2 responses carry the header as well.
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "--http2", "-o", "/dev/null", "-D", "-"])
        .args([
            "--resolve",
            &format!("app.test:{}:127.0.0.1", proxy.https().port()),
        ])
        .arg(format!("https://app.test:{}/h2", proxy.https().port()))
        .output()
        .await
        .expect("run curl");
    let headers = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
    assert!(headers.starts_with("http/2 200"), "{headers}");
    assert!(
        headers.contains(&format!(
            "strict-transport-security: {}",
            HSTS.to_ascii_lowercase()
        )),
        "{headers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_absent_unless_configured() {
    let (_backend, _store, proxy) = start("").await;
    let (mut client, _) = Client::connect_tls(proxy.https(), "app.test")
        .await
        .unwrap();
    let reply = client.get_host("app.test", "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("strict-transport-security"), None);
}
