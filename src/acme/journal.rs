//! The order journal: a JSON file in the state folder with the recent
//! orders per host and how each ended. The manager reads it at start so that
//! a process that crashes and restarts in a loop keeps the retry back-off
//! instead of placing a new order on every start.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::schedule::unix_seconds;
use super::AcmeError;
use crate::tls::write_atomically;

/// Entries kept per host; older ones are dropped on the next write.
pub const ENTRIES_PER_HOST: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Written before the first request of an order. One still pending at
    /// start means the process stopped during the order; it counts as failed.
    Pending,
    Issued,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub id: u64,
    pub host: String,
    /// Why the order was placed, such as "no certificate" or "manual".
    pub trigger: String,
    /// Unix seconds.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: Outcome,
    /// Serial (lower-case hex) and expiry (Unix seconds) of an issued
    /// certificate.
    pub serial: Option<String>,
    pub not_after: Option<i64>,
    /// The error of a failed order, with the ACME problem document if any.
    pub error: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct JournalFile {
    entries: Vec<JournalEntry>,
}

pub(crate) struct Journal {
    path: PathBuf,
    entries: Vec<JournalEntry>,
}

impl Journal {
    /// Reads the journal, or starts an empty one if the file is missing. An
    /// unreadable file is moved aside (its contents are kept for the
    /// operator) and an empty journal starts.
    pub fn load(path: &Path) -> Result<Journal, AcmeError> {
        let mut journal = Journal {
            path: path.to_path_buf(),
            entries: Vec::new(),
        };
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(journal),
            Err(err) => {
                return Err(AcmeError(format!(
                    "cannot read the ACME journal {}: {err}",
                    path.display()
                )))
            }
        };
        match serde_json::from_slice::<JournalFile>(&bytes) {
            Ok(file) => journal.entries = file.entries,
            Err(err) => {
                let aside =
                    path.with_extension(format!("corrupt-{}", unix_seconds(SystemTime::now())));
                tracing::error!(
                    file = %path.display(),
                    moved_to = %aside.display(),
                    error = %err,
                    "invalid ACME journal; moved it aside and started an empty one"
                );
                fs::rename(path, &aside).map_err(|e| {
                    AcmeError(format!(
                        "cannot move the invalid ACME journal {} aside: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        let mut interrupted = false;
        for entry in journal.entries.iter_mut() {
            if entry.outcome == Outcome::Pending {
                entry.outcome = Outcome::Failed;
                entry.finished_at = Some(entry.started_at);
                entry.error = Some("interrupted: the process stopped during the order".into());
                interrupted = true;
            }
        }
        if interrupted {
            journal.save()?;
        }
        Ok(journal)
    }

    pub fn entries(&self) -> &[JournalEntry] {
        &self.entries
    }

    /// Records the start of an order and returns its id.
    pub fn begin(&mut self, host: &str, trigger: &str, now: SystemTime) -> Result<u64, AcmeError> {
        let id = self.entries.iter().map(|e| e.id).max().unwrap_or(0) + 1;
        self.entries.push(JournalEntry {
            id,
            host: host.to_string(),
            trigger: trigger.to_string(),
            started_at: unix_seconds(now),
            finished_at: None,
            outcome: Outcome::Pending,
            serial: None,
            not_after: None,
            error: None,
        });
        self.prune(host);
        self.save()?;
        Ok(id)
    }

    /// Records how the order `id` ended.
    pub fn finish(
        &mut self,
        id: u64,
        outcome: Outcome,
        now: SystemTime,
        serial: Option<String>,
        not_after: Option<i64>,
        error: Option<String>,
    ) -> Result<(), AcmeError> {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.outcome = outcome;
            entry.finished_at = Some(unix_seconds(now));
            entry.serial = serial;
            entry.not_after = not_after;
            entry.error = error;
        }
        self.save()
    }

    /// Consecutive failed orders for `host` since its last issued
    /// certificate, and when the latest of them ended (Unix seconds).
    pub fn failure_streak(&self, host: &str) -> (u32, Option<i64>) {
        let mut count = 0;
        let mut last = None;
        for entry in self.entries.iter().rev().filter(|e| e.host == host) {
            match entry.outcome {
                Outcome::Issued => break,
                Outcome::Failed => {
                    count += 1;
                    if last.is_none() {
                        last = entry.finished_at.or(Some(entry.started_at));
                    }
                }
                Outcome::Pending => {}
            }
        }
        (count, last)
    }

    fn prune(&mut self, host: &str) {
        let count = self.entries.iter().filter(|e| e.host == host).count();
        let mut excess = count.saturating_sub(ENTRIES_PER_HOST);
        self.entries.retain(|e| {
            if excess > 0 && e.host == host {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }

    fn save(&self) -> Result<(), AcmeError> {
        let file = JournalFile {
            entries: self.entries.clone(),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| AcmeError(format!("cannot encode the ACME journal: {e}")))?;
        write_atomically(&self.path, &json, 0o600).map_err(|e| AcmeError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::schedule::from_unix_seconds;

    #[test]
    fn streak_counts_failures_since_last_issue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let mut journal = Journal::load(&path).unwrap();
        let first = journal
            .begin("a.test", "no certificate", from_unix_seconds(100))
            .unwrap();
        journal
            .finish(
                first,
                Outcome::Issued,
                from_unix_seconds(101),
                Some("1f".into()),
                Some(900),
                None,
            )
            .unwrap();
        for t in [200, 300] {
            let id = journal
                .begin("a.test", "renewal", from_unix_seconds(t))
                .unwrap();
            journal
                .finish(
                    id,
                    Outcome::Failed,
                    from_unix_seconds(t + 5),
                    None,
                    None,
                    Some("down".into()),
                )
                .unwrap();
        }
        let other = journal
            .begin("b.test", "renewal", from_unix_seconds(400))
            .unwrap();
        journal
            .finish(
                other,
                Outcome::Failed,
                from_unix_seconds(401),
                None,
                None,
                Some("x".into()),
            )
            .unwrap();
        assert_eq!(journal.failure_streak("a.test"), (2, Some(305)));
        assert_eq!(journal.failure_streak("b.test"), (1, Some(401)));
        assert_eq!(journal.failure_streak("c.test"), (0, None));

        let reloaded = Journal::load(&path).unwrap();
        assert_eq!(reloaded.entries(), journal.entries());
    }

    #[test]
    fn pending_entry_counts_as_interrupted_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let mut journal = Journal::load(&path).unwrap();
        journal
            .begin("a.test", "no certificate", from_unix_seconds(700))
            .unwrap();
        drop(journal);

        let reloaded = Journal::load(&path).unwrap();
        assert_eq!(reloaded.failure_streak("a.test"), (1, Some(700)));
        let entry = &reloaded.entries()[0];
        assert_eq!(entry.outcome, Outcome::Failed);
        assert!(entry.error.as_deref().unwrap().contains("interrupted"));
    }

    #[test]
    fn journal_is_bounded_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let mut journal = Journal::load(&path).unwrap();
        journal
            .begin("b.test", "manual", from_unix_seconds(1))
            .unwrap();
        for t in 0..(ENTRIES_PER_HOST as i64 + 7) {
            journal
                .begin("a.test", "renewal", from_unix_seconds(10 + t))
                .unwrap();
        }
        let hosts_a = journal
            .entries()
            .iter()
            .filter(|e| e.host == "a.test")
            .count();
        assert_eq!(hosts_a, ENTRIES_PER_HOST);
        assert_eq!(
            journal
                .entries()
                .iter()
                .filter(|e| e.host == "b.test")
                .count(),
            1
        );
    }

    #[test]
    fn corrupt_journal_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        fs::write(&path, b"{not json").unwrap();
        let journal = Journal::load(&path).unwrap();
        assert!(journal.entries().is_empty());
        let moved = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt-"));
        assert!(moved);
    }

    #[test]
    fn journal_file_mode_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let mut journal = Journal::load(&path).unwrap();
        journal
            .begin("a.test", "manual", SystemTime::now())
            .unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
