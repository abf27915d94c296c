//! Smoke test: a few hundred requests against the built-in backend, and
//! through Switchyard when `SWITCHYARD_BIN` names a built binary.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use switchyard_bench::backend::{self, BackendOptions};
use switchyard_bench::load::{self, LoadSpec, Mode, RequestKind};
use switchyard_bench::proxies::{self, SwitchyardConfig};
use switchyard_bench::report::Report;
use switchyard_bench::target::Target;

fn spec(label: &str, target: Target, requests: u64) -> LoadSpec {
    let mut spec = LoadSpec::new(label, target);
    spec.connections = 4;
    spec.max_requests = Some(requests);
    spec.duration = Duration::from_secs(20);
    spec
}

fn assert_clean(report: &Report, requests: u64, pool: &str) {
    assert_eq!(report.errors.total(), 0, "{}", report.to_json());
    assert_eq!(report.requests, requests, "{}", report.to_json());
    assert_eq!(report.ok, requests, "{}", report.to_json());
    assert_eq!(
        report.pools.get(pool),
        Some(&requests),
        "{:?}",
        report.pools
    );
    assert!(report.latency.p50_us > 0);
    assert!(report.latency.max_us >= report.latency.p99_us);
    let back = Report::from_json(&report.to_json()).expect("the report must parse back");
    assert!(report.same_as(&back), "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_direct_and_through_proxy() {
    let blue = backend::spawn("127.0.0.1:0".parse().unwrap(), BackendOptions::new("blue")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let direct = load::run(
        &spec("direct", Target::http(blue.addr, "/"), 300),
        Arc::clone(&stop),
    )
    .await
    .unwrap();
    assert_clean(&direct.report, 300, "blue");

    let mut paced = spec("paced", Target::http(blue.addr, "/"), 200);
    paced.mode = Mode::Open { rate: 2000.0 };
    paced.keep_alive = false;
    let paced = load::run(&paced, Arc::clone(&stop)).await.unwrap();
    assert_clean(&paced.report, 200, "blue");
    // 200 requests at 2000/s take about 100 ms; far longer means the
    // schedule was ignored, far shorter that it was not applied.
    assert!(paced.report.elapsed_s > 0.09, "{}", paced.report.elapsed_s);

    let mut signed = spec("signed", Target::http(blue.addr, "/webhook"), 200);
    signed.request = RequestKind::SignedPost {
        secret: b"smoke".to_vec(),
    };
    let signed = load::run(&signed, Arc::clone(&stop)).await.unwrap();
    assert_clean(&signed.report, 200, "blue");

    let Ok(bin) = std::env::var("SWITCHYARD_BIN") else {
        eprintln!("SWITCHYARD_BIN is not set; skipping the run through Switchyard");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = SwitchyardConfig::new(dir.path());
    let http = format!("127.0.0.1:{}", proxies::free_port().unwrap());
    config.http = Some(http.parse().unwrap());
    config.pools = vec![("blue".to_string(), 100, vec![blue.addr])];
    let path = config.write().unwrap();
    let proxy =
        proxies::start_switchyard(bin.as_ref(), &path, false, None, "switchyard.log").unwrap();
    let addr = config.http.unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        proxies::wait_ready(addr, "/", Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(ready.is_ok(), "{ready:?}\n{}", proxy.log_tail(20));
    let proxied = load::run(&spec("switchyard", Target::http(addr, "/"), 300), stop)
        .await
        .unwrap();
    assert_clean(&proxied.report, 300, "blue");
}
