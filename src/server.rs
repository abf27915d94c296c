//! Assembles the Pingora server: the proxy service with its listeners and
//! the background control service (health probes, SIGHUP reloads, the
//! admin socket and shift controllers).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::acme::{AcmeManager, AcmeOptions, CertificateStore, ChallengeKind, PrometheusObserver};
use crate::admin::commands::Actor;
use crate::app::{App, Reloaded};
use crate::config::Config;
use crate::config::ConfigErrors;
use crate::downstream::Downstream;
use crate::metrics;
use crate::proxy::Proxy;
use crate::tls::{self, CertStore, ResolverOptions, SniResolver};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};

/// Read buffer of each HTTPS connection's socket, in bytes: one TLS record
/// of 16 KiB plus its header.
const TLS_READ_BUFFER: usize = 16 * 1024 + 5;

/// Pingora's own command-line switches that `switchyard run` passes through.
#[derive(Clone, Debug, Default)]
pub struct EngineFlags {
    /// Take over the listening sockets of a running instance (`--upgrade`).
    pub upgrade: bool,
    /// Detach and run in the background (`--daemon`).
    pub daemon: bool,
}

/// Builds the server for `app` and runs it until shutdown. Never returns.
pub fn run(app: Arc<App>, flags: EngineFlags) -> ! {
    let snapshot = app.snapshots.load();
    let config: &Config = &snapshot.config;
    let listeners = &config.listeners;

    let conf = ServerConf {
        threads: listeners.threads,
        max_retries: crate::proxy::MAX_ATTEMPTS as usize,
        // One single-threaded runtime per worker thread, each keeping its
        // connections: measured about 8% less CPU per request than tokio's
        // work-stealing runtime, pinned and unpinned (docs/BENCHMARKS.md).
        work_stealing: false,
        grace_period_seconds: Some(listeners.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(listeners.graceful_shutdown_timeout.as_secs()),
        upgrade_sock: listeners.upgrade_socket.to_string_lossy().into_owned(),
        pid_file: listeners.pid_file.to_string_lossy().into_owned(),
        daemon: flags.daemon,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: flags.upgrade,
        daemon: flags.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut http_proxy =
        pingora::proxy::http_proxy(&server.configuration, Proxy::new(Arc::clone(&app)));
    let mut options = HttpServerOptions::default();
    options.h2c = listeners.h2c;
    options.h2_idle_timeout = Some(config.limits.keepalive_timeout);
    http_proxy.server_options = Some(options);
    // The h2 codec refuses a header list above this size before the proxy
    // sees it; the configured limit, which a reload may change, is applied
    // per request by `framing::inspect_http2_head`. Pingora's default cap is
    // 64 KiB, kept unless the configured limit is larger.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_header_list_size(
        u32::try_from(config.limits.max_header_bytes.max(64 * 1024)).unwrap_or(u32::MAX),
    );
    http_proxy.h2_options = Some(h2);
    // Client-side limits wrap the proxy: see `crate::downstream`.
    let front = Downstream::new(http_proxy, Arc::clone(&app), config.limits.max_connections);
    let mut proxy = Service::new("switchyard proxy".to_string(), front);
    if let Some(http) = listeners.http {
        // Unbuffered reads: the front reads each header into its own buffer
        // and Pingora reads bodies into its own, so Pingora's default 64 KiB
        // read buffer per connection would only add a copy and resident
        // memory to every idle keep-alive connection.
        proxy.add_listener(
            ListenerConfig::tcp(http.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    if let Some(https) = listeners.https {
        let (settings, acme) = match https_settings(&app, config) {
            Ok(result) => result,
            Err(message) => {
                eprintln!("cannot start the HTTPS listener on {https}: {message}");
                std::process::exit(1);
            }
        };
        if let Some(manager) = acme.filter(|m| m.options().challenge == ChallengeKind::TlsAlpn01) {
            // TLS-ALPN-01 validation handshakes offer only `acme-tls/1`,
            // which Pingora's listener cannot advertise next to h2 and
            // http/1.1, so the pre-TLS hook completes them before Pingora's handshake.
            proxy
                .endpoints()
                .set_pre_tls_callback(manager.tls_alpn_interceptor());
        }
        // rustls reads TLS records of up to 16 KiB; a buffer of one record
        // keeps the reads per record low without Pingora's default 64 KiB.
        proxy.add_listener(
            ListenerConfig::tcp(https.to_string())
                .tls(settings)
                .l4_buffer(L4BufferSettings::default().read(TLS_READ_BUFFER)),
        );
    }
    let control = background_service(
        "control",
        Control {
            app: Arc::clone(&app),
        },
    );

    server.add_service(proxy);
    server.add_service(control);
    tracing::info!(
        generation = snapshot.generation,
        http = ?listeners.http,
        https = ?listeners.https,
        threads = listeners.threads,
        "switchyard starting"
    );
    drop(snapshot);
    server.run_forever()
}

/// Opens the certificate store, starts the ACME manager when `[acme]` is
/// on, attaches both to `app` and builds the HTTPS listener settings.
fn https_settings(
    app: &App,
    config: &Config,
) -> Result<(TlsSettings, Option<Arc<AcmeManager>>), String> {
    let store = CertStore::open(&config.tls.store).map_err(|e| e.to_string())?;
    let acme = match &config.acme {
        Some(acme_config) => {
            let options = AcmeOptions::from_config(acme_config, &config.tls.store)
                .map_err(|e| e.to_string())?;
            let manager = AcmeManager::new(
                options,
                Arc::clone(&store) as Arc<dyn CertificateStore>,
                config.exact_hosts(),
            )
            .map_err(|e| e.to_string())?
            .with_observer(Arc::new(PrometheusObserver));
            let manager = Arc::new(manager);
            app.set_http01_responder(manager.responder());
            app.set_acme(Arc::clone(&manager));
            Some(manager)
        }
        None => {
            if store.certificates().is_empty() {
                tracing::warn!(
                    store = %config.tls.store.display(),
                    "the certificate store is empty and ACME is off, so every handshake will fail; add NAME.crt and NAME.key"
                );
            }
            None
        }
    };
    let resolver = SniResolver::new(
        Arc::clone(&store),
        ResolverOptions {
            default_certificate: config.tls.default_certificate.clone(),
            reject_unknown_sni: config.tls.reject_unknown_sni,
        },
    );
    app.admin
        .set_cert_control(Arc::new(crate::admin::certs::StoreCertControl {
            store: Arc::clone(&store),
            acme: acme.clone(),
        }));
    app.set_cert_store(store);
    let settings = tls::listener_settings(Arc::new(resolver)).map_err(|e| e.to_string())?;
    Ok((settings, acme))
}

/// Background work that is not request handling: health probes and reloads.
struct Control {
    app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Control {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.app
            .registry
            .start_probes(tokio::runtime::Handle::current());
        if let Some(store) = self.app.cert_store() {
            let every = self.app.snapshots.load().config.tls.rescan_interval;
            tokio::spawn(Arc::clone(store).watch(every));
        }
        if let Some(manager) = self.app.acme() {
            tokio::spawn(Arc::clone(manager).run());
        }
        if let Some(address) = self.app.snapshots.load().config.admin.metrics {
            tokio::spawn(metrics::serve(Arc::clone(&self.app), address));
        }
        crate::admin::start(&self.app, shutdown.clone());
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGHUP; config reloads need the admin socket");
                None
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = reload(&self.app, "SIGHUP", Actor::Signal);
                }
            }
        }
    }
}

/// Reloads the config file (SIGHUP and `ctl reload` both come here):
/// rescans the certificate store, swaps the config, updates the ACME host
/// list, counts and logs the outcome. Each shift the reload cancelled is
/// logged and audited with `actor` as its originator. An invalid file keeps
/// the running config and returns its errors.
pub fn reload(app: &App, trigger: &str, actor: Actor) -> Result<Reloaded, ConfigErrors> {
    if let Some(store) = app.cert_store() {
        for error in store.rescan().errors {
            tracing::error!(trigger, %error, "certificate not loaded");
        }
    }
    let mut result = app.reload();
    match &mut result {
        Ok(reloaded) => {
            metrics::global()
                .config_reloads
                .with_label_values(&["ok"])
                .inc();
            tracing::info!(trigger, generation = reloaded.generation, "config reloaded");
            if let Some(manager) = app.acme() {
                let hosts = app.snapshots.load().config.exact_hosts();
                if let Err(err) = manager.set_hosts(hosts) {
                    tracing::error!(trigger, error = %err, "ACME hosts not updated; the previous list stays");
                }
            }
            for key in &reloaded.needs_restart {
                tracing::warn!(key = %key, "this setting changed but takes effect only after a restart or binary upgrade");
            }
            // The state file must forget what the reload dropped or
            // cancelled, or a restart would bring it back.
            reloaded.state_file_written = crate::admin::commands::persist_after_reload(app);
            crate::admin::commands::log_cancelled_shifts(
                &reloaded.cancelled_shifts,
                actor,
                reloaded.generation,
            );
        }
        Err(errors) => {
            metrics::global()
                .config_reloads
                .with_label_values(&["rejected"])
                .inc();
            for error in &errors.errors {
                tracing::error!(trigger, file = %errors.file.display(), "{error}");
            }
            tracing::error!(
                trigger,
                errors = errors.errors.len(),
                "config reload rejected; the running config stays"
            );
        }
    }
    result
}
