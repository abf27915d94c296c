//! `switchyard ctl`: the operator's client for the admin socket. It sends
//! one request line, prints the response as a table (or raw with `--json`)
//! and exits 0 on `"ok": true`, 1 on an error from the server and 2 when
//! the socket cannot be reached.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::config::Config;

/// Socket path used when neither `--socket` nor `--config` is given.
pub const DEFAULT_SOCKET: &str = "/run/switchyard/admin.sock";

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin socket path [default: admin.socket of --config, else /run/switchyard/admin.sock].
    #[arg(short, long)]
    pub socket: Option<PathBuf>,
    /// Config file whose admin.socket to use.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Print the server's raw JSON response.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Routes, weights, shifts, pools, backends and certificates.
    Status,
    /// Set a route's pool weights atomically; pools not named keep theirs.
    Weights {
        route: String,
        /// POOL=WEIGHT pairs, such as blue=90 green=10.
        #[arg(required = true)]
        weights: Vec<String>,
        /// Apply only if the config generation is still N (compare-and-swap).
        #[arg(long, value_name = "N")]
        expect_generation: Option<u64>,
        /// Give weight to a pool without a healthy backend, or stop a shift in progress.
        #[arg(long)]
        force: bool,
    },
    /// Move a route's traffic to a pool in steps, rolling back on errors or latency.
    Shift {
        route: String,
        /// The pool that receives the traffic.
        #[arg(long)]
        to: String,
        /// Percentage points of the route's traffic moved per step.
        #[arg(long, default_value_t = 10)]
        step: u32,
        /// Time between steps, such as 30s or 2m.
        #[arg(long, default_value = "30s")]
        every: String,
        /// Roll back above this share of failed requests, from 0 to 1 [default: admin.shift_max_error_rate].
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Roll back above this p99 latency, such as 500ms [default: admin.shift_max_p99].
        #[arg(long)]
        max_p99: Option<String>,
        /// Hold a step until a window has this many requests [default: admin.shift_min_requests].
        #[arg(long)]
        min_requests: Option<u64>,
        #[arg(long, value_name = "N")]
        expect_generation: Option<u64>,
        /// Start even if the target pool has no healthy backend.
        #[arg(long)]
        force: bool,
    },
    /// Stop a route's shift and restore the weights it started from.
    Rollback { route: String },
    /// Stop new requests to a backend; requests in flight finish.
    Drain {
        pool: String,
        /// The backend address as the config lists it, such as 127.0.0.1:8001.
        backend: String,
        /// Drain even if a route would be left with no usable backend.
        #[arg(long)]
        force: bool,
    },
    /// Send new requests to a drained backend again (once it is healthy).
    Enable { pool: String, backend: String },
    /// Re-read the config file; an invalid file is rejected and the running config stays.
    Reload,
    /// List certificates.
    Certs,
    /// Renew a domain's certificate now.
    Renew { domain: String },
}

/// Builds the request line for a command.
pub fn request(command: &CtlCommand) -> Result<Value, String> {
    Ok(match command {
        CtlCommand::Status => json!({ "cmd": "status" }),
        CtlCommand::Weights {
            route,
            weights,
            expect_generation,
            force,
        } => {
            let mut map = Map::new();
            for pair in weights {
                let (pool, weight) = pair.split_once('=').ok_or_else(|| {
                    format!("invalid weight {pair:?}; write POOL=WEIGHT, such as green=10")
                })?;
                let weight: i64 = weight.trim().parse().map_err(|_| {
                    format!(
                        "invalid weight {pair:?}; the weight must be an integer, such as green=10"
                    )
                })?;
                map.insert(pool.trim().to_string(), json!(weight));
            }
            let mut request = json!({ "cmd": "weights", "route": route, "weights": map });
            set_optional(
                &mut request,
                "expect_generation",
                expect_generation.map(|g| json!(g)),
            );
            if *force {
                set_optional(&mut request, "force", Some(json!(true)));
            }
            request
        }
        CtlCommand::Shift {
            route,
            to,
            step,
            every,
            max_error_rate,
            max_p99,
            min_requests,
            expect_generation,
            force,
        } => {
            let mut request =
                json!({ "cmd": "shift", "route": route, "to": to, "step": step, "every": every });
            set_optional(
                &mut request,
                "max_error_rate",
                max_error_rate.map(|v| json!(v)),
            );
            set_optional(&mut request, "max_p99", max_p99.as_ref().map(|v| json!(v)));
            set_optional(&mut request, "min_requests", min_requests.map(|v| json!(v)));
            set_optional(
                &mut request,
                "expect_generation",
                expect_generation.map(|g| json!(g)),
            );
            if *force {
                set_optional(&mut request, "force", Some(json!(true)));
            }
            request
        }
        CtlCommand::Rollback { route } => json!({ "cmd": "rollback", "route": route }),
        CtlCommand::Drain {
            pool,
            backend,
            force,
        } => {
            let mut request = json!({ "cmd": "drain", "pool": pool, "backend": backend });
            if *force {
                set_optional(&mut request, "force", Some(json!(true)));
            }
            request
        }
        CtlCommand::Enable { pool, backend } => {
            json!({ "cmd": "enable", "pool": pool, "backend": backend })
        }
        CtlCommand::Reload => json!({ "cmd": "reload" }),
        CtlCommand::Certs => json!({ "cmd": "certs" }),
        CtlCommand::Renew { domain } => json!({ "cmd": "renew", "domain": domain }),
    })
}

fn set_optional(request: &mut Value, key: &str, value: Option<Value>) {
    if let (Value::Object(map), Some(value)) = (request, value) {
        map.insert(key.to_string(), value);
    }
}

/// The admin socket ctl connects to, with a warning for the operator when
/// the path came from a config file that does not validate.
#[derive(Debug)]
pub struct SocketChoice {
    pub path: PathBuf,
    pub warning: Option<String>,
}

/// Picks the socket path: `--socket`, else `admin.socket` of `--config`,
/// else [`DEFAULT_SOCKET`].
///
/// A config file with errors still yields its `admin.socket`, read on its
/// own, because an operator who broke the file during an incident must
/// still be able to run `status` or `rollback`. The result then carries a
/// warning that points at `switchyard check`.
pub fn socket_path(args: &CtlArgs) -> Result<SocketChoice, String> {
    if let Some(socket) = &args.socket {
        return Ok(SocketChoice {
            path: socket.clone(),
            warning: None,
        });
    }
    let Some(file) = &args.config else {
        return Ok(SocketChoice {
            path: PathBuf::from(DEFAULT_SOCKET),
            warning: None,
        });
    };
    let (socket, warning) = match Config::load(file) {
        Ok(config) => (config.admin.socket, None),
        Err(errors) => {
            let socket = read_admin_socket(file)?;
            let warning = format!(
                "{}: the config has {} error(s), so only admin.socket was read from it; run `switchyard check -c {}` to list them",
                file.display(),
                errors.errors.len(),
                file.display()
            );
            (socket, Some(warning))
        }
    };
    let path = socket.ok_or_else(|| {
        format!(
            "{} sets no admin.socket; add one, or pass the socket with -s SOCKET",
            file.display()
        )
    })?;
    Ok(SocketChoice { path, warning })
}

/// Reads `[admin] socket` from a config file that does not validate,
/// ignoring every other key. Returns `None` when the file sets no socket,
/// which is the config default (no admin socket). A relative path is
/// relative to the file's folder, as in a loaded config.
fn read_admin_socket(file: &Path) -> Result<Option<PathBuf>, String> {
    let text = std::fs::read_to_string(file).map_err(|err| {
        format!(
            "cannot read the config file {}: {err}; pass the admin socket with -s SOCKET",
            file.display()
        )
    })?;
    let socket = match text.parse::<toml::Table>() {
        Ok(table) => match table.get("admin").and_then(|admin| admin.get("socket")) {
            None => None,
            Some(toml::Value::String(socket)) => Some(socket.clone()),
            Some(other) => {
                return Err(format!(
                    "{}: admin.socket must be a string, not {other}; fix it, or pass the admin socket with -s SOCKET",
                    file.display()
                ))
            }
        },
        Err(err) => Some(scan_admin_socket(&text).ok_or_else(|| {
            format!(
                "{}: cannot find admin.socket because the file is not valid TOML ({}); pass the admin socket with -s SOCKET",
                file.display(),
                err.message().trim()
            )
        })?),
    };
    let base = file.parent().unwrap_or(Path::new("."));
    Ok(socket.map(|socket| base.join(socket)))
}

/// Finds the admin socket in text that is not valid TOML, line by line:
/// `socket = VALUE` inside `[admin]`, or `admin.socket = VALUE` before the
/// first table header, where VALUE is a one-line TOML string. Returns
/// `None` unless exactly one such line is found.
///
/// NOTE: a `[admin]` line inside a multi-line string is taken for a table
/// header. A wrong path only makes the connection fail with that path in
/// the error message.
fn scan_admin_socket(text: &str) -> Option<String> {
    let mut table: Option<&str> = None;
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            let header = header.split('#').next().unwrap_or("").trim_end();
            table = Some(header.strip_suffix(']').unwrap_or(header).trim());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let is_socket = match table {
            Some(table) => table == "admin" && key == "socket",
            None => key == "admin.socket",
        };
        if !is_socket {
            continue;
        }
        // Parsing `value = VALUE` on its own handles quoting, escapes and a
        // trailing comment the way a TOML reader does.
        let parsed = format!("value = {value}").parse::<toml::Table>().ok();
        if let Some(toml::Value::String(socket)) = parsed.and_then(|t| t.get("value").cloned()) {
            found.push(socket);
        }
    }
    match found.as_slice() {
        [socket] => Some(socket.clone()),
        _ => None,
    }
}

/// Sends one request and returns the response object.
pub fn call(socket: &Path, request: &Value, timeout: Duration) -> Result<Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|err| {
        format!(
            "cannot connect to the admin socket {}: {err}; check that switchyard runs with admin.socket set to this path and that you may open it",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut response = String::new();
    BufReader::new(&stream)
        .read_line(&mut response)
        .map_err(|e| {
            format!(
                "no response from {} within the timeout: {e}",
                socket.display()
            )
        })?;
    serde_json::from_str(&response)
        .map_err(|e| format!("invalid response {:?}: {e}", response.trim()))
}

pub fn run(args: CtlArgs) -> ExitCode {
    let request = match request(&args.command) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let socket = match socket_path(&args) {
        Ok(choice) => {
            if let Some(warning) = &choice.warning {
                eprintln!("warning: {warning}");
            }
            choice.path
        }
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    // A renewal waits for the certificate authority; everything else is local.
    let timeout = match args.command {
        CtlCommand::Renew { .. } => Duration::from_secs(300),
        _ => Duration::from_secs(30),
    };
    let response = match call(&socket, &request, timeout) {
        Ok(response) => response,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let ok = response.get("ok").and_then(Value::as_bool) == Some(true);
    if args.json {
        println!("{response}");
    } else if ok {
        print!("{}", render(&args.command, &response));
    } else {
        eprintln!(
            "error: {}",
            response
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("the server answered without an error message")
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn weights_text(weights: &Value) -> String {
    match weights.as_object() {
        Some(map) => map
            .iter()
            .map(|(pool, weight)| format!("{pool}={weight}"))
            .collect::<Vec<_>>()
            .join(" "),
        None => "-".to_string(),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Formats rows as columns padded to the widest cell.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Renders a successful response as text for a terminal.
pub fn render(command: &CtlCommand, response: &Value) -> String {
    let generation = text(&response["generation"]);
    match command {
        CtlCommand::Status => render_status(response),
        CtlCommand::Weights { .. } | CtlCommand::Rollback { .. } => format!(
            "route {}: {} -> {} (generation {generation})\n",
            text(&response["route"]),
            weights_text(&response["previous"]),
            weights_text(&response["weights"]),
        ),
        CtlCommand::Shift { .. } => format!(
            "route {}: shift toward {} started: {} -> {} (generation {generation})\nfollow it with the status command\n",
            text(&response["route"]),
            text(&response["shift"]["to"]),
            weights_text(&response["previous"]),
            weights_text(&response["weights"]),
        ),
        CtlCommand::Drain { .. } | CtlCommand::Enable { .. } => format!(
            "{} {}: {} (health {}, {} request(s) in flight, generation {generation})\n",
            text(&response["pool"]),
            text(&response["backend"]),
            if response["drained"] == json!(true) { "drained" } else { "enabled" },
            text(&response["health"]),
            text(&response["in_flight"]),
        ),
        CtlCommand::Reload => {
            let mut out = format!("config reloaded (generation {generation})\n");
            for key in response["needs_restart"].as_array().into_iter().flatten() {
                out.push_str(&format!("{} changed; it takes effect after a restart or binary upgrade\n", text(key)));
            }
            for route in response["dropped_runtime_weights"].as_array().into_iter().flatten() {
                out.push_str(&format!("route {}: runtime weights dropped because its pools changed\n", text(route)));
            }
            for shift in response["cancelled_shifts"].as_array().into_iter().flatten() {
                out.push_str(&format!("route {}: shift toward {} {}\n", text(&shift["route"]), text(&shift["to"]), text(&shift["reason"])));
            }
            out
        }
        CtlCommand::Certs => render_certs(&response["certificates"]),
        CtlCommand::Renew { .. } => format!("{}: {}\n", text(&response["domain"]), text(&response["result"])),
    }
}

fn render_status(response: &Value) -> String {
    let mut out = format!(
        "generation {}  config {}\n\n",
        text(&response["generation"]),
        text(&response["config"])
    );
    let mut rows = vec![vec![
        "ROUTE".to_string(),
        "WEIGHTS".to_string(),
        "FROM".to_string(),
        "SHIFT".to_string(),
    ]];
    for route in response["routes"].as_array().into_iter().flatten() {
        let shift = &route["shift"];
        let shift_text = if shift.is_null() {
            match &route["last_shift"] {
                Value::Null => "-".to_string(),
                last => format!("last: {}", text(last)),
            }
        } else {
            format!(
                "to {} step {} every {}: {}",
                text(&shift["to"]),
                text(&shift["step"]),
                text(&shift["every"]),
                text(&shift["state"])
            )
        };
        rows.push(vec![
            text(&route["name"]),
            weights_text(&route["weights"]),
            text(&route["weights_from"]),
            shift_text,
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let mut rows = vec![vec![
        "POOL".to_string(),
        "BACKEND".to_string(),
        "HEALTH".to_string(),
        "DRAINED".to_string(),
        "IN-FLIGHT".to_string(),
        "LAST ERROR".to_string(),
    ]];
    for pool in response["pools"].as_array().into_iter().flatten() {
        for backend in pool["backends"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&pool["name"]),
                text(&backend["address"]),
                text(&backend["health"]),
                if backend["drained"] == json!(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                text(&backend["in_flight"]),
                text(&backend["last_error"]),
            ]);
        }
    }
    out.push_str(&table(&rows));
    out.push('\n');
    out.push_str(&render_certs(&response["certificates"]));
    out
}

fn render_certs(certificates: &Value) -> String {
    match certificates {
        Value::Array(list) if list.is_empty() => "certificates: none\n".to_string(),
        Value::Array(list) => {
            let mut out = format!(
                "{:<24} {:<10} {:<12} {:<40} {}\n",
                "CERTIFICATE", "EXPIRES", "MANAGED BY", "SERIAL", "NAMES"
            );
            for cert in list {
                let names = cert["dns_names"]
                    .as_array()
                    .map(|names| names.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "{:<24} {:<10} {:<12} {:<40} {}\n",
                    text(&cert["name"]),
                    format!("{}d", text(&cert["expires_in_days"])),
                    text(&cert["managed_by"]),
                    text(&cert["serial"]),
                    names
                ));
            }
            out
        }
        Value::Object(map) if map.contains_key("error") => {
            format!("certificates: {}\n", text(&map["error"]))
        }
        other => format!("certificates: {other}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_pairs_become_request() {
        let command = CtlCommand::Weights {
            route: "app".into(),
            weights: vec!["blue=90".into(), "green=10".into()],
            expect_generation: Some(3),
            force: false,
        };
        assert_eq!(
            request(&command).unwrap(),
            json!({"cmd":"weights","route":"app","weights":{"blue":90,"green":10},"expect_generation":3})
        );
        let bad = CtlCommand::Weights {
            route: "app".into(),
            weights: vec!["green".into()],
            expect_generation: None,
            force: false,
        };
        assert!(request(&bad).unwrap_err().contains("\"green\""));
    }

    #[test]
    fn scan_finds_admin_socket_in_broken_toml() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "[admin]\nsocket = \"/run/a.sock\" # comment\n[[routes]\n",
                Some("/run/a.sock"),
            ),
            ("admin.socket = 'a.sock'\nbroken =\n", Some("a.sock")),
            ("[log]\nsocket = \"x.sock\"\nbroken =\n", None),
            ("[admin]\nmetrics = \"off\"\nbroken =\n", None),
            ("[admin]\nsocket = \"a.sock\"\nsocket = \"b.sock\"\n", None),
        ];
        for (text, expected) in cases {
            assert_eq!(
                scan_admin_socket(text).as_deref(),
                *expected,
                "text: {text:?}"
            );
        }
    }

    #[test]
    fn admin_socket_read_from_invalid_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("switchyard.toml");
        std::fs::write(&file, "[admin]\nsocket = \"admin.sock\"\nsocket_mode = 7\n").unwrap();
        assert_eq!(
            read_admin_socket(&file).unwrap(),
            Some(dir.path().join("admin.sock"))
        );

        std::fs::write(&file, "[admin]\nmetrics = \"off\"\n[[routes]]\n").unwrap();
        assert_eq!(read_admin_socket(&file).unwrap(), None);

        std::fs::write(&file, "[admin]\nsocket = 5\n").unwrap();
        let error = read_admin_socket(&file).unwrap_err();
        assert!(error.contains("-s SOCKET"), "{error}");

        std::fs::write(&file, "[admin\nsocket = \n").unwrap();
        let error = read_admin_socket(&file).unwrap_err();
        assert!(error.contains("switchyard.toml"), "{error}");
        assert!(error.contains("-s SOCKET"), "{error}");
    }

    #[test]
    fn table_pads_columns() {
        let rows = vec![
            vec!["A".to_string(), "B".to_string()],
            vec!["long".to_string(), "x".to_string()],
        ];
        assert_eq!(table(&rows), "A     B\nlong  x\n");
    }
}
