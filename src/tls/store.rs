//! The certificate store: PEM files in one folder, loaded into memory and
//! swapped atomically so that a new certificate serves the next handshake.
//!
//! Layout: each certificate is a pair `NAME.crt` (PEM chain, leaf first)
//! and `NAME.key` (PEM private key: PKCS#8, SEC1 or PKCS#1). The names a
//! certificate serves come from its leaf's DNS subject alternative names,
//! not from the file name. Subfolders (such as `acme/`) are not scanned.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

/// Facts about a loaded certificate, for `ctl certs`, metrics and ACME.
#[derive(Clone, Debug, Serialize)]
pub struct CertInfo {
    /// File stem: `NAME` of `NAME.crt` and `NAME.key`.
    pub name: String,
    pub dns_names: Vec<String>,
    /// Serial number in lower-case hex without leading zeros.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

#[derive(Debug)]
pub struct TlsError {
    pub path: PathBuf,
    pub message: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for TlsError {}

fn tls_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub(crate) struct Loaded {
    pub info: CertInfo,
    pub key: Arc<CertifiedKey>,
    /// Modification times and sizes of the two files, to skip unchanged ones.
    fingerprint: (i64, u64, i64, u64),
}

/// The map the resolver reads: names to certificates.
#[derive(Default)]
pub(crate) struct CertMap {
    pub by_stem: BTreeMap<String, Arc<Loaded>>,
    pub exact: HashMap<String, Arc<Loaded>>,
    /// Keyed by the suffix after `*.`.
    pub wildcard: HashMap<String, Arc<Loaded>>,
}

impl CertMap {
    fn build(by_stem: BTreeMap<String, Arc<Loaded>>) -> CertMap {
        let mut map = CertMap {
            by_stem,
            ..CertMap::default()
        };
        for loaded in map.by_stem.values() {
            for name in &loaded.info.dns_names {
                let (table, key) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut map.wildcard, suffix.to_string()),
                    None => (&mut map.exact, name.clone()),
                };
                // When two certificates cover a name, the one valid longer
                // wins; ties go to the file name that sorts first.
                let replace = table
                    .get(&key)
                    .is_none_or(|current| loaded.info.not_after > current.info.not_after);
                if replace {
                    table.insert(key, Arc::clone(loaded));
                }
            }
        }
        map
    }

    /// Finds the certificate for an SNI name: exact, then a one-label wildcard.
    pub fn find(&self, name: &str) -> Option<&Arc<Loaded>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Some(found);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

/// Result of one scan of the store folder.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub unchanged: usize,
    pub removed: Vec<String>,
    pub errors: Vec<TlsError>,
}

pub struct CertStore {
    dir: PathBuf,
    pub(crate) map: ArcSwap<CertMap>,
    /// Serializes scans and installs so they never interleave their swaps.
    writer: Mutex<()>,
}

impl CertStore {
    /// Opens the store folder (creating it with mode 0700 if missing) and
    /// loads every certificate in it. Broken files are logged and skipped.
    pub fn open(dir: &Path) -> Result<Arc<CertStore>, TlsError> {
        if !dir.exists() {
            fs::create_dir_all(dir)
                .map_err(|e| tls_error(dir, format!("cannot create the certificate store: {e}")))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let store = Arc::new(CertStore {
            dir: dir.to_path_buf(),
            map: ArcSwap::from_pointee(CertMap::default()),
            writer: Mutex::new(()),
        });
        let report = store.rescan();
        for error in &report.errors {
            tracing::error!(%error, "certificate not loaded");
        }
        Ok(store)
    }

    /// Loads the certificates in `dir` without creating the folder, for
    /// `switchyard check`. A missing folder is not an error because `open`
    /// creates it at startup, so it yields an empty report.
    pub fn inspect(dir: &Path) -> (Vec<CertInfo>, ScanReport) {
        if !dir.exists() {
            return (Vec::new(), ScanReport::default());
        }
        let store = CertStore {
            dir: dir.to_path_buf(),
            map: ArcSwap::from_pointee(CertMap::default()),
            writer: Mutex::new(()),
        };
        let report = store.rescan();
        (store.certificates(), report)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads changed files and swaps the new map in. A file that fails to
    /// load keeps the certificate previously loaded under its name.
    pub fn rescan(&self) -> ScanReport {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.map.load_full();
        let mut report = ScanReport::default();
        let mut next = BTreeMap::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) => {
                report.errors.push(tls_error(
                    &self.dir,
                    format!("cannot read the certificate store: {err}"),
                ));
                return report;
            }
        };
        let mut stems: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let path = entry.path();
                (path.extension()? == "crt")
                    .then(|| path.file_stem()?.to_str().map(str::to_string))?
            })
            .collect();
        stems.sort();
        for stem in stems {
            let cert_path = self.dir.join(format!("{stem}.crt"));
            let key_path = self.dir.join(format!("{stem}.key"));
            let previous = current.by_stem.get(&stem);
            let fingerprint = match (file_fingerprint(&cert_path), file_fingerprint(&key_path)) {
                (Some(c), Some(k)) => (c.0, c.1, k.0, k.1),
                (_, None) => {
                    report.errors.push(tls_error(
                        &key_path,
                        format!(
                            "missing private key for {}; put the PEM key next to the chain",
                            cert_path.display()
                        ),
                    ));
                    if let Some(previous) = previous {
                        next.insert(stem, Arc::clone(previous));
                    }
                    continue;
                }
                (None, _) => continue,
            };
            if let Some(previous) = previous.filter(|p| p.fingerprint == fingerprint) {
                report.unchanged += 1;
                next.insert(stem, Arc::clone(previous));
                continue;
            }
            match load_pair(&stem, &cert_path, &key_path, fingerprint) {
                Ok(loaded) => {
                    report.loaded.push(stem.clone());
                    next.insert(stem, Arc::new(loaded));
                }
                Err(mut err) => {
                    if let Some(previous) = previous {
                        err.message.push_str(&format!(
                            "; still serving the previously loaded certificate (serial {})",
                            previous.info.serial
                        ));
                        next.insert(stem, Arc::clone(previous));
                    }
                    report.errors.push(err);
                }
            }
        }
        report.removed = current
            .by_stem
            .keys()
            .filter(|stem| !next.contains_key(*stem))
            .cloned()
            .collect();
        self.map.store(Arc::new(CertMap::build(next)));
        for name in &report.loaded {
            tracing::info!(name = %name, "certificate loaded");
        }
        for name in &report.removed {
            tracing::info!(name = %name, "certificate removed from the store");
        }
        report
    }

    /// Validates a chain and key, writes both files atomically (the key with
    /// mode 0600) and serves them from the next handshake.
    pub fn install(
        &self,
        name: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<CertInfo, TlsError> {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(tls_error(
                &self.dir,
                format!("invalid certificate name {name:?}"),
            ));
        }
        let cert_path = self.dir.join(format!("{name}.crt"));
        let key_path = self.dir.join(format!("{name}.key"));
        // Validate before touching the files in use.
        parse_pair(chain_pem, key_pem, &cert_path, &key_path)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_atomically(&key_path, key_pem, 0o600)?;
        write_atomically(&cert_path, chain_pem, 0o644)?;
        let fingerprint = match (file_fingerprint(&cert_path), file_fingerprint(&key_path)) {
            (Some(c), Some(k)) => (c.0, c.1, k.0, k.1),
            _ => return Err(tls_error(&cert_path, "the written files vanished")),
        };
        let loaded = Arc::new(load_pair(name, &cert_path, &key_path, fingerprint)?);
        let info = loaded.info.clone();
        let mut by_stem = self.map.load().by_stem.clone();
        by_stem.insert(name.to_string(), loaded);
        self.map.store(Arc::new(CertMap::build(by_stem)));
        tracing::info!(name = %name, serial = %info.serial, "certificate installed");
        Ok(info)
    }

    pub fn certificates(&self) -> Vec<CertInfo> {
        self.map
            .load()
            .by_stem
            .values()
            .map(|l| l.info.clone())
            .collect()
    }

    /// Returns true when no certificate is loaded, so every handshake fails.
    pub fn is_empty(&self) -> bool {
        self.map.load().by_stem.is_empty()
    }

    /// The certificate a client sending `host` as SNI gets, without the
    /// default fallback.
    pub fn lookup(&self, host: &str) -> Option<CertInfo> {
        self.map.load().find(host).map(|l| l.info.clone())
    }

    /// Rescans every `every` until the process stops; runs on the control
    /// service's runtime. A zero interval turns periodic scans off, which
    /// leaves SIGHUP as the only trigger.
    ///
    /// An error is logged when it first appears, not on every scan: a broken
    /// file left in place would otherwise log once per interval. A SIGHUP
    /// rescan (`crate::server::reload`) logs all current errors again.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        if every.is_zero() {
            tracing::info!(
                store = %self.dir.display(),
                "periodic certificate rescans are off (tls.rescan_interval is 0); send SIGHUP to rescan"
            );
            return;
        }
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut logged: HashSet<String> = HashSet::new();
        loop {
            ticker.tick().await;
            let store = Arc::clone(&self);
            let Ok(report) = tokio::task::spawn_blocking(move || store.rescan()).await else {
                continue;
            };
            let current: HashSet<String> = report.errors.iter().map(|e| e.to_string()).collect();
            for error in &report.errors {
                if !logged.contains(&error.to_string()) {
                    tracing::error!(%error, "certificate not loaded");
                }
            }
            logged = current;
        }
    }
}

fn file_fingerprint(path: &Path) -> Option<(i64, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), meta.len()))
}

fn load_pair(
    stem: &str,
    cert_path: &Path,
    key_path: &Path,
    fingerprint: (i64, u64, i64, u64),
) -> Result<Loaded, TlsError> {
    let chain_pem =
        fs::read(cert_path).map_err(|e| tls_error(cert_path, format!("cannot read: {e}")))?;
    let key_pem =
        fs::read(key_path).map_err(|e| tls_error(key_path, format!("cannot read: {e}")))?;
    if let Ok(meta) = fs::metadata(key_path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key is readable by group or others; run chmod 600 on it"
            );
        }
    }
    let (key, mut info) = parse_pair(&chain_pem, &key_pem, cert_path, key_path)?;
    info.name = stem.to_string();
    Ok(Loaded {
        info,
        key: Arc::new(key),
        fingerprint,
    })
}

/// Parses and cross-checks a chain and key.
pub(crate) fn parse_pair(
    chain_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertifiedKey, CertInfo), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(cert_path, format!("invalid PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(tls_error(
            cert_path,
            "no certificate found; expected a PEM chain with the leaf first",
        ));
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| tls_error(key_path, format!("invalid PEM private key: {e}")))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| tls_error(key_path, format!("unsupported private key: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| tls_error(cert_path, format!("invalid leaf certificate: {e}")))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                dns_names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if dns_names.is_empty() {
        if let Some(cn) = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            dns_names.push(cn.to_ascii_lowercase());
        }
    }
    let info = CertInfo {
        name: String::new(),
        dns_names,
        serial: format!("{:x}", parsed.serial),
        not_before: parsed.validity().not_before.timestamp(),
        not_after: parsed.validity().not_after.timestamp(),
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
    };
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        tls_error(
            key_path,
            format!(
                "the private key does not match the certificate in {}: {e}",
                cert_path.display()
            ),
        )
    })?;
    Ok((certified, info))
}

/// Writes `bytes` to `path` through a temporary file in the same folder:
/// write, fsync, rename, fsync the folder. Readers see the old or the new
/// file, never a partial one.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let temp = dir.join(format!(
        ".{}.{}.{nanos}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&temp);
        tls_error(path, format!("cannot write atomically: {e}"))
    })
}

/// Generates a self-signed certificate for `hosts` and writes it to the
/// store as `NAME.crt` and `NAME.key`.
pub fn generate_self_signed(dir: &Path, name: &str, hosts: &[&str]) -> Result<(), TlsError> {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names).map_err(|e| {
        tls_error(
            dir,
            format!("cannot generate a self-signed certificate: {e}"),
        )
    })?;
    fs::create_dir_all(dir)
        .map_err(|e| tls_error(dir, format!("cannot create the folder: {e}")))?;
    write_atomically(
        &dir.join(format!("{name}.key")),
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomically(
        &dir.join(format!("{name}.crt")),
        generated.cert.pem().as_bytes(),
        0o644,
    )?;
    Ok(())
}
