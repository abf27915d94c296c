//! Assembles the Pingora server: the proxy service with its listeners and
//! the background control service (health probes, SIGHUP reloads, the
//! admin socket and shift controllers).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};

use crate::app::App;
use crate::config::Config;
use crate::proxy::Proxy;

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

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Proxy::new(Arc::clone(&app)),
        "switchyard proxy",
    );
    if listeners.h2c {
        if let Some(logic) = proxy.app_logic_mut() {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            logic.server_options = Some(options);
        }
    }
    if let Some(http) = listeners.http {
        proxy.add_tcp(&http.to_string());
    }
    // TODO: the HTTPS listener joins here with the certificate store.
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
                } => reload(&self.app, "SIGHUP"),
            }
        }
    }
}

/// Reloads the config file and logs the outcome; an invalid file keeps the
/// running config.
pub fn reload(app: &App, trigger: &str) {
    match app.reload() {
        Ok(reloaded) => {
            tracing::info!(trigger, generation = reloaded.generation, "config reloaded");
            for key in reloaded.needs_restart {
                tracing::warn!(key = %key, "this setting changed but takes effect only after a restart or binary upgrade");
            }
        }
        Err(errors) => {
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
}
