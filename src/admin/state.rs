//! The state file: runtime weights, drained backends and shifts in
//! progress, written before a change is acknowledged and read at start.
//!
//! Precedence at start: the state file wins over the config file's weights
//! for each route whose pools are the same in both. A route whose pools
//! changed in the config file keeps the file's weights, and its runtime
//! weights and shift are dropped with a warning. A drained backend that is
//! no longer in its pool is dropped the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shift::ShiftPlan;
use crate::config::{Config, MAX_WEIGHT};
use crate::snapshot::Overrides;

/// The format version this build writes and reads.
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// The snapshot generation that wrote the file; informational only,
    /// because generations restart at 1 in a new process.
    #[serde(default)]
    generation: u64,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    written_at: u64,
    #[serde(default)]
    weights: BTreeMap<String, BTreeMap<String, u32>>,
    #[serde(default)]
    drained: Vec<Drained>,
    #[serde(default)]
    shifts: BTreeMap<String, ShiftPlan>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drained {
    pool: String,
    backend: SocketAddr,
}

/// Runtime state read back from the state file.
#[derive(Debug, Default)]
pub struct Restored {
    pub overrides: Overrides,
    pub shifts: BTreeMap<String, ShiftPlan>,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the state atomically: a temporary file in the same directory,
/// fsync, rename over the old file, fsync of the directory. The file is
/// created with mode 0600.
pub fn write(
    path: &Path,
    overrides: &Overrides,
    shifts: &BTreeMap<String, ShiftPlan>,
    generation: u64,
) -> std::io::Result<()> {
    let state = StateFile {
        version: VERSION,
        generation,
        written_at: now_unix(),
        weights: overrides.weights.clone(),
        drained: overrides
            .drained
            .iter()
            .map(|(pool, backend)| Drained {
                pool: pool.clone(),
                backend: *backend,
            })
            .collect(),
        shifts: shifts.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&state).map_err(std::io::Error::other)?;
    text.push(b'\n');
    crate::tls::write_atomically(path, &text, 0o600)
        .map_err(|err| std::io::Error::other(err.message))
}

/// Reads the state file named by `admin.state_file`, if any, and keeps what
/// still fits `config`. An unreadable file is renamed to `FILE.invalid`
/// (so the next write does not destroy it) and the config file's weights
/// apply; the error is logged.
pub fn restore(config: &Config) -> Restored {
    let Some(path) = config.admin.state_file.as_deref() else {
        tracing::warn!(
            "admin.state_file is not set, so weights and drains set at runtime are lost on restart"
        );
        return Restored::default();
    };
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(state_file = %path.display(), "no state file yet; using the config file's weights");
            return Restored::default();
        }
        Err(err) => {
            tracing::error!(state_file = %path.display(), error = %err, "cannot read the state file; using the config file's weights");
            return Restored::default();
        }
    };
    match parse(&text) {
        Ok(state) => fit(config, state, path),
        Err(message) => {
            let aside = set_aside(path);
            tracing::error!(
                state_file = %path.display(),
                moved_to = %aside.display(),
                error = %message,
                "the state file is invalid; using the config file's weights, fix or delete the moved file"
            );
            Restored::default()
        }
    }
}

fn parse(text: &[u8]) -> Result<StateFile, String> {
    let state: StateFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if state.version != VERSION {
        return Err(format!(
            "unsupported state file version {}; this build reads version {VERSION}",
            state.version
        ));
    }
    Ok(state)
}

fn set_aside(path: &Path) -> PathBuf {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".invalid");
    let aside = PathBuf::from(aside);
    if let Err(err) = std::fs::rename(path, &aside) {
        tracing::error!(state_file = %path.display(), error = %err, "cannot move the invalid state file aside");
    }
    aside
}

/// Keeps the parts of `state` that match `config`, warning about the rest.
fn fit(config: &Config, state: StateFile, path: &Path) -> Restored {
    let mut overrides = Overrides::default();
    for (route_name, weights) in state.weights {
        let Some(route) = config.route(&route_name) else {
            tracing::warn!(route = %route_name, "dropping runtime weights of a route that is no longer in the config file");
            continue;
        };
        let file_pools: BTreeSet<&String> = route.pools.iter().map(|(p, _)| p).collect();
        if weights.keys().collect::<BTreeSet<_>>() != file_pools {
            tracing::warn!(route = %route_name, "dropping runtime weights because the route's pools changed in the config file");
            continue;
        }
        if weights.values().all(|w| *w == 0) || weights.values().any(|w| *w > MAX_WEIGHT) {
            tracing::warn!(route = %route_name, "dropping runtime weights that are all 0 or above the maximum");
            continue;
        }
        overrides.weights.insert(route_name, weights);
    }
    for drained in state.drained {
        let known = config
            .pools
            .get(&drained.pool)
            .is_some_and(|p| p.backends.iter().any(|b| b.address == drained.backend));
        if known {
            overrides.drained.insert((drained.pool, drained.backend));
        } else {
            tracing::warn!(pool = %drained.pool, backend = %drained.backend, "dropping the drain of a backend that is no longer in the config file");
        }
    }
    let mut shifts = BTreeMap::new();
    for (route_name, plan) in state.shifts {
        let fits = overrides.weights.contains_key(&route_name)
            && plan.route == route_name
            && config.route(&route_name).is_some_and(|route| {
                route.pools.iter().any(|(p, _)| *p == plan.to)
                    && route.pools.iter().map(|(p, _)| p).collect::<BTreeSet<_>>()
                        == plan.start_weights.keys().collect::<BTreeSet<_>>()
            });
        if fits {
            shifts.insert(route_name, plan);
        } else {
            tracing::warn!(route = %route_name, to = %plan.to, "dropping the shift in progress because its route or pools changed in the config file");
        }
    }
    tracing::info!(
        state_file = %path.display(),
        routes = ?overrides.weights.keys().collect::<Vec<_>>(),
        drained = overrides.drained.len(),
        shifts = ?shifts.keys().collect::<Vec<_>>(),
        "restored runtime state; it takes precedence over the config file's weights"
    );
    Restored { overrides, shifts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, pools: &str) -> Config {
        let text = format!(
            "[listeners]\nhttp = \"127.0.0.1:1\"\n[admin]\nstate_file = \"state.json\"\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = {pools}\n[pools.blue]\nbackends = [\"127.0.0.1:2\"]\n[pools.green]\nbackends = [\"127.0.0.1:3\"]\n[pools.red]\nbackends = [\"127.0.0.1:4\"]\n"
        );
        Config::parse(&text, &dir.join("switchyard.toml")).unwrap()
    }

    #[test]
    fn write_then_restore() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "{ blue = 100, green = 0 }");
        let mut overrides = Overrides::default();
        overrides.weights.insert(
            "app".into(),
            BTreeMap::from([("blue".into(), 10), ("green".into(), 90)]),
        );
        overrides
            .drained
            .insert(("blue".into(), "127.0.0.1:2".parse().unwrap()));
        let path = config.admin.state_file.clone().unwrap();
        write(&path, &overrides, &BTreeMap::new(), 3).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let restored = restore(&config);
        assert_eq!(restored.overrides, overrides);
    }

    #[test]
    fn changed_pools_drop_route_state() {
        let dir = tempfile::tempdir().unwrap();
        let before = config(dir.path(), "{ blue = 100, green = 0 }");
        let mut overrides = Overrides::default();
        overrides.weights.insert(
            "app".into(),
            BTreeMap::from([("blue".into(), 10), ("green".into(), 90)]),
        );
        let path = before.admin.state_file.clone().unwrap();
        write(&path, &overrides, &BTreeMap::new(), 3).unwrap();
        let after = config(dir.path(), "{ blue = 100, red = 0 }");
        assert!(restore(&after).overrides.weights.is_empty());
    }

    #[test]
    fn invalid_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "{ blue = 100, green = 0 }");
        let path = config.admin.state_file.clone().unwrap();
        std::fs::write(&path, "{not json").unwrap();
        let restored = restore(&config);
        assert_eq!(restored.overrides, Overrides::default());
        assert!(!path.exists());
        assert!(dir.path().join("state.json.invalid").exists());
    }
}
