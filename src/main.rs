//! Switchyard: an edge reverse proxy and blue/green traffic switcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        /// Take over the listening sockets of the running instance
        /// (zero-downtime binary upgrade), then send it SIGQUIT.
        #[arg(short, long)]
        upgrade: bool,
        /// Detach and run in the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a config file: print every error and exit 1, or a summary and exit 0.
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

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_log::LogTracer::init();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(config) => {
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
        } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            init_logging(&config.log.level, config.log.json);
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
    init_logging("info", false);
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
