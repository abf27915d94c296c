//! The admin socket: a Unix stream socket speaking one JSON object per line
//! each way, with bounded line length, client count and idle time.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::ShutdownWatch;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::commands::{self, Actor};
use super::protocol::{self, AdminError, ErrorCode};
use crate::app::App;

/// Maximum request line length in bytes, newline included. A longer
/// line gets an error and the connection is closed.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at the same time; one more gets an error and is closed.
pub const MAX_CLIENTS: usize = 16;
/// How long a connection may stay without sending a complete line.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long writing one response may take before the client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new process started with `--upgrade` waits for the old one
/// to let go of the socket before taking the path over.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(30);

/// A bound listener and the identity of the socket file it created, so the
/// file is removed at exit only if no other process has replaced it.
pub struct BoundSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    mode: u32,
    identity: (u64, u64),
}

impl BoundSocket {
    fn remove_if_ours(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(err) = std::fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %err, "cannot remove the admin socket file");
            }
        }
    }
}

enum Probe {
    Free,
    Stale,
    Live,
}

/// Finds out whether `path` is free, a stale socket with no listener, or live.
fn probe(path: &Path) -> Result<Probe, String> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::Free),
        Err(err) => {
            return Err(format!(
                "cannot inspect the admin socket path {}: {err}",
                path.display()
            ))
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(format!(
            "the admin socket path {} exists and is not a socket; remove it or set admin.socket to another path",
            path.display()
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(Probe::Live),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => Ok(Probe::Stale),
        Err(err) => Err(format!(
            "cannot check whether the admin socket {} is in use: {err}",
            path.display()
        )),
    }
}

/// Binds `path` with `mode`. The socket is created under a temporary name,
/// given its mode, then renamed into place, so it is never reachable under
/// `path` with looser permissions, and a live socket at `path` is replaced
/// in one step.
fn bind(path: &Path, mode: u32) -> Result<BoundSocket, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "the directory {} of the admin socket does not exist; create it or set admin.socket to another path",
            dir.display()
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "admin.sock".to_string());
    let temp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let fail = |what: &str, err: std::io::Error| {
        let _ = std::fs::remove_file(&temp);
        format!("cannot {what} the admin socket {}: {err}", path.display())
    };
    let listener = std::os::unix::net::UnixListener::bind(&temp).map_err(|e| fail("bind", e))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail("set the mode of", e))?;
    std::fs::rename(&temp, path).map_err(|e| fail("move into place", e))?;
    let metadata = std::fs::symlink_metadata(path).map_err(|e| fail("inspect", e))?;
    Ok(BoundSocket {
        listener,
        path: path.to_path_buf(),
        mode,
        identity: (metadata.dev(), metadata.ino()),
    })
}

/// Binds the socket at start. A socket file nobody listens on is removed
/// first. A live one is an error, except with `upgrade`, where `None` means
/// "take it over once the old process lets go".
pub fn bind_at_start(path: &Path, mode: u32, upgrade: bool) -> Result<Option<BoundSocket>, String> {
    match probe(path)? {
        Probe::Free => bind(path, mode).map(Some),
        Probe::Stale => {
            tracing::info!(socket = %path.display(), "removing a stale admin socket file");
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove the stale admin socket {}: {e}", path.display()))?;
            bind(path, mode).map(Some)
        }
        Probe::Live if upgrade => Ok(None),
        Probe::Live => Err(format!(
            "the admin socket {} is in use by a running process; stop it, set admin.socket to another path, or start with --upgrade to take over from it",
            path.display()
        )),
    }
}

/// After a binary upgrade: waits for the old process to remove its socket
/// (it does on SIGQUIT), then binds. If it has not after a while, replaces it.
pub async fn take_over(path: &Path, mode: u32) -> Result<BoundSocket, String> {
    let deadline = Instant::now() + TAKE_OVER_WAIT;
    loop {
        match probe(path)? {
            Probe::Free => return bind(path, mode),
            Probe::Stale => {
                let _ = std::fs::remove_file(path);
                return bind(path, mode);
            }
            Probe::Live if Instant::now() >= deadline => {
                tracing::warn!(socket = %path.display(), "the previous process still holds the admin socket; taking the path over");
                return bind(path, mode);
            }
            Probe::Live => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Serves clients until shutdown, or until SIGQUIT starts a handover to a
/// new process. On a handover this process stops taking changes and stops
/// its shift controllers, so the new process, which reads the state file
/// once it holds the socket, is the only writer from then on.
pub async fn serve(app: Arc<App>, bound: Option<BoundSocket>, mut shutdown: ShutdownWatch) {
    let listener = match bound.as_ref().map(|b| {
        b.listener
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .and_then(UnixListener::from_std)
    }) {
        Some(Ok(listener)) => Some(listener),
        Some(Err(err)) => {
            tracing::error!(error = %err, "cannot serve the admin socket; switchyard ctl is off");
            None
        }
        None => None,
    };
    if let Some(bound) = &bound {
        tracing::info!(socket = %bound.path.display(), mode = format!("{:o}", bound.mode), "admin socket listening");
    }
    let mut quit = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGQUIT; a binary upgrade will not stop this process's shift controllers");
            None
        }
    };
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(()) = async {
                match quit.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                app.admin.handing_over.store(true, Ordering::SeqCst);
                tracing::info!("SIGQUIT: handing the admin socket and the shift controllers over to the new process");
                break;
            }
            accepted = async {
                match listener.as_ref() {
                    Some(listener) => listener.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((stream, _)) = accepted else { continue };
                match Arc::clone(&clients).try_acquire_owned() {
                    Ok(permit) => {
                        let app = Arc::clone(&app);
                        tokio::spawn(async move {
                            serve_client(&app, stream).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tokio::spawn(reject_busy(stream));
                    }
                }
            }
        }
    }
    drop(listener);
    // Waits for a change in progress, so the state file is final before the
    // socket path is released.
    drop(app.snapshots.lock_writer());
    if let Some(bound) = &bound {
        bound.remove_if_ours();
    }
}

async fn reject_busy(mut stream: UnixStream) {
    let error = AdminError::new(
        ErrorCode::Unavailable,
        format!("too many admin clients ({MAX_CLIENTS} connected); close one and try again"),
    );
    let _ = write_response(&mut stream, &error.to_response()).await;
}

async fn write_response(
    stream: &mut (impl AsyncWriteExt + Unpin),
    response: &serde_json::Value,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

async fn serve_client(app: &Arc<App>, stream: UnixStream) {
    let actor = match stream.peer_cred() {
        Ok(cred) => Actor::Client {
            uid: Some(cred.uid()),
            pid: cred.pid(),
        },
        Err(_) => Actor::Client {
            uid: None,
            pid: None,
        },
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        let read = tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader).take(limit).read_until(b'\n', &mut line),
        )
        .await;
        match read {
            Err(_) => {
                let error = AdminError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "no complete request line within {}; closing the connection",
                        humantime::format_duration(IDLE_TIMEOUT)
                    ),
                );
                let _ = write_response(&mut write, &error.to_response()).await;
                return;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
        }
        if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
            let error = AdminError::new(
                ErrorCode::TooLong,
                format!("the request line is longer than {MAX_LINE} bytes; send one compact JSON object per line"),
            );
            let _ = write_response(&mut write, &error.to_response()).await;
            return;
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let response = match protocol::parse_line(text) {
            Ok((request, id)) => {
                if app.admin.is_handing_over() && request != protocol::Request::Status {
                    protocol::error_response(&commands::handing_over(), id)
                } else {
                    match commands::execute(app, request, actor).await {
                        Ok(fields) => protocol::ok_response(fields, id),
                        Err(error) => protocol::error_response(&error, id),
                    }
                }
            }
            Err((error, id)) => protocol::error_response(&error, id),
        };
        if write_response(&mut write, &response).await.is_err() {
            return;
        }
    }
}
