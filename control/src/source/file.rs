//! The YAML file source (`sluice --config FILE`).
//!
//! This module owns everything between the file on disk and
//! [`Publisher::publish`]:
//! - the schema (see `examples/*.yaml`) and its validation, with errors that
//!   say file, line, column and reason ([`parse`], [`ConfigError`]);
//! - the start-up read ([`load`]): the daemon exits 64 with the error's one
//!   line when it fails;
//! - the watch loop ([`watch`], [`FileWatcher`]): re-reads the file every poll
//!   interval and compares the bytes (so a ConfigMap's symlink swap is seen
//!   like any edit), reloads at once when told to (SIGHUP), publishes a good
//!   table, and keeps the last good table live when the file is missing,
//!   unreadable or invalid.
//!
//! # Schema
//!
//! ```yaml
//! services:                        # required; `services: []` is an empty table
//!   - name: web                    # required, non-empty; logs and metrics
//!     listen: 127.0.0.1:8080       # required; IPv6 quoted: "[::1]:8080"
//!     protocol: tcp                # default tcp; or udp (same listen address allowed)
//!     udpTimeoutSeconds: 30        # udp only; default 30 s unreplied, 120 s replied
//!     udpResend: true              # udp only; default: on for port 53 only
//!     policy: round-robin          # default; or least-connections, maglev, source-hash
//!     affinity: { timeoutSeconds: 600 }  # optional; {} means 10800; 1..=86400
//!     backends:                    # required; `backends: []` for none
//!       - address: 10.0.0.1:9000   # required, unique within the service
//!         ready: true              # default true
//!         serving: true            # default: same as ready
//!         terminating: false       # default false
//!         weight: 1                # default 1; 0 = no new connections
//! ```
//!
//! The schema is declared once, as [`ConfigDoc`] and the types it holds;
//! tests and `sluice-bench` write files with them ([`ConfigDoc::to_yaml`]).
//!
//! Unknown or repeated fields, nulls, wrong types, port 0, and a listen
//! address used by two services are errors. An error is one line:
//! `FILE:LINE:COLUMN: WHERE: REASON`, the position being that of the node at
//! fault (the value, the repeated key, or the mapping missing a field) and
//! WHERE naming the service by its 0-based index and name, e.g.
//! `sluice.yaml:12:18: services[1] "api": backend 10.0.0.1:80: weight:
//! expected an integer in 0..=4294967295, found -1`.
//!
//! An empty file is an error, not an empty table, so that a file caught
//! half-written by a non-atomic editor does not tear every listener down;
//! write the file atomically (rename) anyway, since a truncated file can
//! still be valid YAML.
//!
//! # Use from the daemon
//!
//! ```no_run
//! # use std::{sync::Arc, time::Duration};
//! # use sluice_control::{Publisher, source::file};
//! # async fn daemon(path: std::path::PathBuf) {
//! let table = match file::load(&path) {
//!     Ok(table) => table,
//!     Err(err) => {
//!         eprintln!("{err}"); // `sluice.yaml:12:18: services[1] "api": ...`
//!         std::process::exit(64);
//!     }
//! };
//! let publisher = Arc::new(Publisher::new());
//! publisher.publish(table);
//! let reload = Arc::new(tokio::sync::Notify::new()); // SIGHUP: reload.notify_one()
//! tokio::spawn(file::watch(path, Duration::from_secs(2), publisher, reload));
//! # }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::publish::Publisher;
use crate::table::Table;

mod doc;
mod schema;
#[cfg(test)]
mod tests;
mod tree;

pub use doc::{AffinityDoc, BackendDoc, ConfigDoc, ServiceDoc, ToYamlError};

/// A file larger than this is refused (a config is a few KiB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The shortest poll interval [`watch`] uses; shorter ones (zero included)
/// are raised to it.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Why a configuration file gave no table. `Display` is one line, starting
/// with the file name, meant to be shown as is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not a regular file,
    /// too large).
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The content is not a valid configuration.
    #[error("{path}{}: {message}", OptPosition(.position))]
    Invalid {
        path: String,
        /// Where the problem is; `None` when the parser cannot tell.
        position: Option<Position>,
        /// The reason, e.g. `services[1] "api": backend 10.0.0.1:80:
        /// weight: expected an integer in 0..=4294967295, found -1`.
        message: String,
    },
}

impl ConfigError {
    /// Where the problem is in the file, when it is about the content.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { position, .. } => *position,
        }
    }
}

/// A place in the file; both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

struct OptPosition<'a>(&'a Option<Position>);

impl fmt::Display for OptPosition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, ":{}:{}", p.line, p.column),
            None => Ok(()),
        }
    }
}

/// Parses and validates a configuration. Pure: `path` only names the file in
/// errors.
pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Table, ConfigError> {
    schema::parse_table(text).map_err(|f| ConfigError::Invalid {
        path: path.as_ref().display().to_string(),
        position: f.position.map(|(line, column)| Position { line, column }),
        message: f.message,
    })
}

/// Parses configuration bytes: [`parse`] after a UTF-8 check.
pub fn parse_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Table, ConfigError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(path, text),
        Err(err) => {
            let valid = bytes.get(..err.valid_up_to()).unwrap_or_default();
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(valid.get(line_start..).unwrap_or_default())
                .chars()
                .count()
                + 1;
            Err(ConfigError::Invalid {
                path: path.as_ref().display().to_string(),
                position: Some(Position { line, column }),
                message: "not valid UTF-8".to_owned(),
            })
        }
    }
}

/// Reads and parses the file once (start-up).
pub fn load(path: impl AsRef<Path>) -> Result<Table, ConfigError> {
    let path = path.as_ref();
    let bytes = read(path)?;
    parse_bytes(path, &bytes)
}

/// Reads the whole file, refusing what is not a regular file (a FIFO would
/// block forever) or is larger than [`MAX_FILE_BYTES`]. Follows symlinks.
fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let fail = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    let not_regular = || {
        fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    };
    // Checked before opening too: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path).map_err(fail)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(1 << 20));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_FILE_BYTES >> 20),
        )));
    }
    Ok(bytes)
}

/// The watch loop's state, for a readiness or debug endpoint and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStatus {
    /// Completed checks (polls and reloads) since the loop started.
    pub checks: u64,
    /// The current problem (one line, as logged): the file is unreadable or
    /// invalid and the last good table is serving. `None` when the live
    /// table is the file's.
    pub error: Option<String>,
}

/// Watches the file forever: see [`FileWatcher::run`].
///
/// Convenience for `FileWatcher::new(..).run()`; use [`FileWatcher`] to also
/// get its [`FileStatus`].
pub async fn watch(
    path: impl Into<PathBuf>,
    poll_interval: Duration,
    publisher: Arc<Publisher>,
    reload: Arc<Notify>,
) -> Infallible {
    FileWatcher::new(path, poll_interval, publisher, reload)
        .run()
        .await
}

/// The file source's watch loop.
#[derive(Debug)]
pub struct FileWatcher {
    poll_interval: Duration,
    publisher: Arc<Publisher>,
    reload: Arc<Notify>,
    tracker: Tracker,
    status: tokio::sync::watch::Sender<FileStatus>,
}

impl FileWatcher {
    /// `poll_interval` below [`MIN_POLL_INTERVAL`] is raised to it. The
    /// daemon wires SIGHUP to `reload.notify_one()` (a permit is kept if the
    /// loop is busy, so no signal is lost).
    pub fn new(
        path: impl Into<PathBuf>,
        poll_interval: Duration,
        publisher: Arc<Publisher>,
        reload: Arc<Notify>,
    ) -> Self {
        Self {
            poll_interval: poll_interval.max(MIN_POLL_INTERVAL),
            publisher,
            reload,
            tracker: Tracker::new(path.into()),
            status: tokio::sync::watch::Sender::new(FileStatus::default()),
        }
    }

    /// Follows the loop's [`FileStatus`], updated after every check.
    pub fn status(&self) -> tokio::sync::watch::Receiver<FileStatus> {
        self.status.subscribe()
    }

    /// Never returns. Checks the file at once, then every poll interval and
    /// whenever `reload` is notified. A check re-reads the file and, when its
    /// bytes differ from the last read (or on `reload`), parses it:
    /// - valid: publishes the table; logs at info that it was loaded when
    ///   the live table changed (the proxy's `table live` line says what
    ///   changed);
    /// - invalid: logs the error at error level, once per distinct content
    ///   (and on every `reload`); the live table stays;
    /// - unreadable: logs the error once per distinct error, not per poll;
    ///   the live table stays.
    pub async fn run(mut self) -> Infallible {
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let reload = tokio::select! {
                _ = ticker.tick() => Reload::Polled,
                () = self.reload.notified() => Reload::Forced,
            };
            let path = self.tracker.path.clone();
            let read = match tokio::task::spawn_blocking(move || read(&path)).await {
                Ok(read) => read,
                Err(join) => Err(ConfigError::Read {
                    path: self.tracker.name.clone(),
                    source: io::Error::other(join.to_string()),
                }),
            };
            self.tracker.check(read, reload, &self.publisher);
            let error = self.tracker.error().map(str::to_owned);
            self.status.send_modify(|s| {
                s.checks += 1;
                s.error = error;
            });
            if reload == Reload::Forced {
                // Restart the period: the file was just read.
                ticker.reset();
            }
        }
    }
}

/// Why a check runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    /// The poll interval elapsed: parse only bytes that changed.
    Polled,
    /// Told to (SIGHUP): parse, and report an error, even if the bytes are
    /// the same.
    Forced,
}

/// What one check did (returned for tests; the loop only logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Same bytes as the last read: nothing parsed.
    SameContent,
    /// Parsed; equal to the live table, nothing published.
    SameTable,
    /// Published as this generation.
    Published(u64),
    /// Unreadable or invalid; `logged` tells whether the error was logged.
    Failed { logged: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    Read(String),
    Invalid(String),
}

/// The decisions of the watch loop, without the timing: pure but for the
/// logs and the publish, so that it is tested directly.
#[derive(Debug)]
struct Tracker {
    path: PathBuf,
    /// `path` as shown in logs.
    name: String,
    /// Bytes of the last successful read, valid or not.
    content: Option<Vec<u8>>,
    problem: Option<Problem>,
}

impl Tracker {
    fn new(path: PathBuf) -> Self {
        Self {
            name: path.display().to_string(),
            path,
            content: None,
            problem: None,
        }
    }

    /// The current problem, as logged.
    fn error(&self) -> Option<&str> {
        match &self.problem {
            Some(Problem::Read(e) | Problem::Invalid(e)) => Some(e),
            None => None,
        }
    }

    fn check(
        &mut self,
        read: Result<Vec<u8>, ConfigError>,
        reload: Reload,
        publisher: &Publisher,
    ) -> Outcome {
        let forced = reload == Reload::Forced;
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(err) => {
                let problem = Problem::Read(err.to_string());
                let logged = forced || self.problem.as_ref() != Some(&problem);
                if logged {
                    tracing::error!(
                        "{err}; keeping the last good table (generation {})",
                        publisher.snapshot().generation
                    );
                }
                self.problem = Some(problem);
                return Outcome::Failed { logged };
            }
        };
        // After a read error, parse again even if the bytes are the same:
        // the state to return to may be "invalid" as well as "good".
        let was_read_error = matches!(self.problem, Some(Problem::Read(_)));
        if !forced && !was_read_error && self.content.as_deref() == Some(&bytes[..]) {
            return Outcome::SameContent;
        }
        let parsed = parse_bytes(&self.path, &bytes);
        self.content = Some(bytes);
        let table = match parsed {
            Ok(table) => table,
            Err(err) => {
                // Only reached for new content (or a forced reload, or a
                // recovered read error): this is once per distinct content.
                tracing::error!(
                    "{err}; keeping the last good table (generation {})",
                    publisher.snapshot().generation
                );
                self.problem = Some(Problem::Invalid(err.to_string()));
                return Outcome::Failed { logged: true };
            }
        };
        let recovered = self.problem.take();
        let services = table.len();
        match publisher.publish(table) {
            Some(generation) => {
                tracing::info!(
                    "{}: configuration loaded, generation {generation} ({services} services)",
                    self.name
                );
                Outcome::Published(generation)
            }
            None => {
                match recovered {
                    Some(Problem::Read(_)) => {
                        tracing::info!("{}: readable again, table unchanged", self.name);
                    }
                    Some(Problem::Invalid(_)) => {
                        tracing::info!("{}: valid again, table unchanged", self.name);
                    }
                    None if forced => tracing::info!("{}: reloaded, table unchanged", self.name),
                    None => {}
                }
                Outcome::SameTable
            }
        }
    }
}
