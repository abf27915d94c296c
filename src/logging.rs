//! Log setup: one `tracing` subscriber for Switchyard's events and for
//! Pingora's, which logs through the `log` crate.
//!
//! By default lines go to stderr through a background writer thread, so a
//! request never waits on the terminal or a log pipe. When the writer's
//! queue is full, the request path blocks instead of dropping lines: an
//! access log that silently loses entries is worse than a slower response.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
/// With `background_writer` false, each line is written by the thread that
/// logs it, which a process that forks later (`--daemon`) needs because a
/// writer thread does not survive a fork. Later calls do nothing.
pub fn init(level: &str, json: bool, background_writer: bool) {
    static GUARD: OnceLock<Option<WorkerGuard>> = OnceLock::new();
    if GUARD.get().is_some() {
        return;
    }
    if background_writer {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .finish(std::io::stderr());
        if install(level, json, writer) {
            let _ = GUARD.set(Some(guard));
        }
    } else if install(level, json, std::io::stderr) {
        let _ = GUARD.set(None);
    }
}

fn install<W>(level: &str, json: bool, writer: W) -> bool
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    // `try_init` also installs the `log` to `tracing` bridge that carries
    // Pingora's events.
    let installed = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
    installed.is_ok()
}
