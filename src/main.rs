//! Switchyard: an edge reverse proxy and blue/green traffic switcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc malloc: the proxy allocates and frees small
/// buffers on every request, and glibc's allocator showed up as about a
/// tenth of the proxy's CPU time in `perf` profiles of keep-alive load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use switchyard::config::Config;
use switchyard::{admin, app, demo, server};

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Edge reverse proxy and blue/green traffic switcher"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Take over the listening sockets of the running instance for a
        /// zero-downtime binary upgrade; then send the old process SIGQUIT.
        #[arg(short, long)]
        upgrade: bool,
        /// Detach and run in the background.
        #[arg(short, long)]
        daemon: bool,
        /// Log in JSON, one object per line, whatever the config says.
        #[arg(long)]
        json_logs: bool,
    },
    /// Validate a config file: print every error and exit 1, or a summary
    /// (after any certificate warnings) and exit 0.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start the proxy with built-in blue and green backends on loopback.
    Demo {
        /// Plain HTTP listener address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// HTTPS listener address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Metrics and health listener address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        metrics: SocketAddr,
        /// Folder for the demo's config, certificate and sockets
        /// [default: a new folder under the system temp dir].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Talk to a running proxy over its admin socket.
    Ctl(admin::ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(config) => {
                // Certificate problems are warnings and the exit status stays
                // 0, because certificates may arrive after the proxy starts.
                for warning in switchyard::tls::certificate_warnings(&config) {
                    eprintln!("{}: warning: {warning}", config.source.display());
                }
                println!("{}", config.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!(
                    "{}: {} error(s)",
                    errors.file.display(),
                    errors.errors.len()
                );
                ExitCode::from(1)
            }
        },
        Command::Run {
            config,
            upgrade,
            daemon,
            json_logs,
        } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            // A daemon forks after this point, and a writer thread does not
            // survive a fork, so a daemon logs directly.
            switchyard::logging::init(&config.log.level, config.log.json || json_logs, !daemon);
            let restored = admin::state::restore(&config);
            let app = app::App::new(config, restored.overrides);
            if let Err(message) = admin::prepare(&app, restored.shifts, upgrade) {
                eprintln!("error: {message}");
                return ExitCode::from(1);
            }
            server::run(app, server::EngineFlags { upgrade, daemon })
        }
        Command::Ctl(args) => admin::ctl::run(args),
        Command::Demo {
            http,
            https,
            metrics,
            dir,
        } => {
            let options = demo::DemoOptions {
                http,
                https,
                metrics,
                dir,
            };
            run_demo(options)
        }
    }
}

fn run_demo(options: demo::DemoOptions) -> ExitCode {
    switchyard::logging::init("info", false, true);
    let dir = options.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()))
    });
    let (blue, green) = match demo::start_backends() {
        Ok(addresses) => addresses,
        Err(err) => {
            eprintln!("cannot start the demo backends on 127.0.0.1: {err}");
            return ExitCode::from(1);
        }
    };
    if let Err(err) = switchyard::tls::generate_self_signed(
        &dir.join("certs"),
        "localhost",
        &["localhost", "127.0.0.1"],
    ) {
        eprintln!("{err}");
        return ExitCode::from(1);
    }
    let path = match demo::write_config(&dir, &options, blue, green) {
        Ok(path) => path,
        Err(err) => {
            eprintln!("cannot write the demo config in {}: {err}", dir.display());
            return ExitCode::from(1);
        }
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let restored = admin::state::restore(&config);
    let app = app::App::new(config, restored.overrides);
    if let Err(message) = admin::prepare(&app, restored.shifts, false) {
        eprintln!("error: {message}");
        return ExitCode::from(1);
    }
    println!("{}", demo::instructions(&options, &path));
    server::run(app, server::EngineFlags::default())
}
