//! The audit trail (`--audit-log PATH|-`): one JSON object per line for
//! every token decision (granted, denied, failed, invalidated) and every
//! token a watch stream or sink received, with the peer, what it asked for
//! and a fingerprint of the token, never the token. Lines go through a
//! bounded queue to a writer thread, so a slow disk never slows the hit
//! path: a full queue drops the line and counts it. The file is opened
//! append-only (0600, or 0640 with `--audit-log-group`) and reopened on
//! SIGHUP, as logrotate expects: lines recorded before the signal go to
//! the moved file, lines after it to the new one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::SystemTime;

use serde::Serialize;

use crate::peer::Place;
use crate::policy::Caller;
use crate::request::TokenKey;
use crate::telemetry::RateLimitedLog;
use crate::telemetry::metrics::{Rpc, code_name};
use crate::token::Token;

/// Lines waiting for the writer at most (about 10 MiB of lines).
pub const QUEUE_LINES: usize = 16_384;
/// Least time between two warnings about dropped lines.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Where the trail goes: a file, or standard output (`-`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Standard output.
    Stdout,
    /// An append-only file, and the group that may read it.
    File {
        /// The file.
        path: PathBuf,
        /// `--audit-log-group`: made 0640 and owned by this gid.
        group: Option<u32>,
    },
}

/// Why the audit log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The directory may be changed by others, who could swap the file.
    #[error(
        "audit log {path}: its directory {dir} can be changed by users other than its owner (mode {mode:04o}); use a directory only the broker's user may write"
    )]
    UnsafeDirectory {
        /// The file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// The directory's permission bits.
        mode: u32,
    },
    /// The file cannot be opened.
    #[error("cannot open audit log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// What happened, as the `event` field says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A token was handed out.
    Grant,
    /// The policy refused the request.
    Deny,
    /// The request failed otherwise (bad input, upstream, limits).
    Error,
    /// A token was handed back.
    Invalidate,
    /// A watch stream received a token.
    WatchToken,
    /// A file sink was written.
    SinkWrite,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Deny => "deny",
            Self::Error => "error",
            Self::Invalidate => "invalidate",
            Self::WatchToken => "watch_token",
            Self::SinkWrite => "sink_write",
        }
    }
}

/// One decision, before it becomes a line.
pub struct Event<'a> {
    /// What happened.
    pub kind: EventKind,
    /// Through which RPC.
    pub rpc: Rpc,
    /// Who asked.
    pub caller: &'a Caller,
    /// What was asked for, when the request was valid enough to say.
    pub key: Option<&'a TokenKey>,
    /// The token handed out.
    pub token: Option<&'a Arc<Token>>,
    /// The token handed back (an invalidation), fingerprinted only.
    pub handed_back: Option<&'a str>,
    /// `hit`, `miss` or `coalesced`, for a grant.
    pub cache: Option<&'static str>,
    /// The gRPC code of a refusal or failure (`OK` otherwise).
    pub code: tonic::Code,
}

/// An event with nothing but its kind, RPC, caller and key: the rest
/// defaults to no token and `OK`.
pub fn event<'a>(
    kind: EventKind,
    rpc: Rpc,
    caller: &'a Caller,
    key: Option<&'a TokenKey>,
) -> Event<'a> {
    Event {
        kind,
        rpc,
        caller,
        key,
        token: None,
        handed_back: None,
        cache: None,
        code: tonic::Code::Ok,
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    event: &'static str,
    rpc: &'static str,
    transport: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<PeerLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audience: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<&'a [String]>,
    /// A downscoped token's boundary: Google's `accessBoundaryRules`.
    #[serde(skip_serializing_if = "Option::is_none")]
    access_boundary: Option<serde_json::Value>,
    outcome: &'static str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expire_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_sha256: Option<String>,
}

#[derive(Serialize)]
struct PeerLine {
    uid: u32,
    gid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe: Option<String>,
    /// With workload identity, the UID of the peer's pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<String>,
}

enum Message {
    Record(Box<Record>),
    /// Reopen the file once the lines queued before this are written.
    Reopen,
}

/// What the hit path hands the writer: the event's facts, owned and cheap
/// to copy (the token is shared, not copied); the writer formats the line,
/// reads the peer's binary and fingerprints the token, off the hit path.
struct Record {
    time: SystemTime,
    kind: EventKind,
    rpc: Rpc,
    transport: &'static str,
    peer: Option<crate::peer::Peer>,
    key: Option<TokenKey>,
    /// What `default` in the key stands for, if known.
    default_account: Option<Arc<str>>,
    token: Option<Arc<Token>>,
    handed_back: Option<String>,
    cache: Option<&'static str>,
    code: tonic::Code,
}

impl Record {
    fn of(event: &Event<'_>, default_account: Option<Arc<str>>) -> Self {
        Self {
            default_account,
            time: SystemTime::now(),
            kind: event.kind,
            rpc: event.rpc,
            transport: transport(event.rpc, event.caller),
            peer: event.caller.peer().copied(),
            key: event.key.cloned(),
            token: event.token.cloned(),
            // Rare (an invalidation): fingerprinted now, never kept.
            handed_back: event.handed_back.map(fingerprint),
            cache: event.cache,
            code: event.code,
        }
    }
}

/// The audit trail; cloning is cheap. Recording never blocks.
#[derive(Clone)]
pub struct AuditLog {
    sender: SyncSender<Message>,
    /// The account `default` stands for, where the source knows it.
    default_account: Option<Arc<str>>,
    dropped: Arc<Dropped>,
    /// Records in the queue, so that a full queue costs a request only a
    /// load and a count, not a record built to be thrown away.
    queued: Arc<AtomicUsize>,
    /// Set by SIGHUP when the queue is too full to hold the reopen: the
    /// writer reopens the file after the batch it is writing.
    reopen: Arc<AtomicBool>,
}

/// Lines lost, to the queue being full or the disk failing: counted, and
/// warned about at most every [`WARN_EVERY`].
struct Dropped {
    total: AtomicU64,
    warnings: RateLimitedLog,
    on_drop: Box<dyn Fn(u64) + Send + Sync>,
}

impl Dropped {
    fn count(&self, lines: u64, why: &str) {
        let total = self.total.fetch_add(lines, Ordering::Relaxed) + lines;
        (self.on_drop)(lines);
        self.warnings.warn_many(lines, |since| {
            tracing::warn!(dropped = total, since, why, "audit log lines dropped")
        });
    }
}

impl AuditLog {
    /// Opens `destination` (refusing a file in a directory others may
    /// change) and starts the writer thread. `on_drop` is called with the
    /// number of lines dropped, each time some are (the metric).
    pub fn open(
        destination: Destination,
        default_account: Option<&str>,
        on_drop: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Self, AuditError> {
        let dropped = Arc::new(Dropped {
            total: AtomicU64::new(0),
            warnings: RateLimitedLog::every(WARN_EVERY),
            on_drop: Box::new(on_drop),
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer::open(destination, dropped.clone(), queued.clone(), reopen.clone())?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| AuditError::Open {
                path: PathBuf::from("(the writer thread)"),
                source,
            })?;
        Ok(Self {
            sender,
            default_account: default_account.map(Arc::from),
            dropped,
            queued,
            reopen,
        })
    }

    /// Reopens the file (after logrotate moved it) once the lines recorded
    /// before are written, so they land in the moved file and later ones
    /// in the new file. Never blocks: with the queue full, the writer
    /// reopens after its current batch instead (no line is lost either way).
    pub fn reopen(&self) {
        if self.sender.try_send(Message::Reopen).is_err() {
            self.reopen.store(true, Ordering::Release);
        }
    }

    /// Records `event`, or drops it (counted) if the writer is behind.
    pub fn record(&self, event: &Event<'_>) {
        const BEHIND: &str = "the audit log's disk is slower than the traffic";
        if self.queued.load(Ordering::Relaxed) >= QUEUE_LINES {
            self.dropped.count(1, BEHIND);
            return;
        }
        let record = Box::new(Record::of(event, self.default_account.clone()));
        // Counted before it is sent, so that the writer (which the channel
        // orders after this) never takes it uncounted.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sender.try_send(Message::Record(record))
        {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.count(1, BEHIND);
        }
    }
}

/// The JSON line of `record` (no token in it: its SHA-256 prefix only).
fn line(record: &Record) -> String {
    let peer = record.peer.map(|peer| PeerLine {
        uid: peer.uid,
        gid: peer.gid,
        pid: peer.pid,
        pod_uid: match peer.place {
            Place::Pod(uid) => Some(uid.to_string()),
            Place::Host | Place::Unknown => None,
        },
        exe: peer.pid.and_then(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|path| path.display().to_string())
        }),
    });
    let (audience, scopes) = match &record.key {
        Some(TokenKey::Id(key)) => (Some(key.audience.as_str()), None),
        Some(TokenKey::Access(key)) => (None, Some(key.scopes.as_slice())),
        Some(TokenKey::Downscoped(key)) => (None, Some(key.source.scopes.as_slice())),
        None => (None, None),
    };
    let line = Line {
        time: humantime::format_rfc3339_millis(record.time).to_string(),
        event: record.kind.as_str(),
        rpc: record.rpc.as_str(),
        transport: record.transport,
        peer,
        service_account: record.key.as_ref().map(|key| {
            // The real email where the source knows it, not `default`.
            match (key.account(), &record.default_account) {
                (crate::request::ServiceAccount::Default, Some(email)) => email,
                (account, _) => account.as_str(),
            }
        }),
        token_kind: record.key.as_ref().map(|key| key.kind().as_str()),
        audience,
        scopes,
        access_boundary: record
            .key
            .as_ref()
            .and_then(TokenKey::boundary)
            .map(|boundary| boundary.to_json()["accessBoundary"]["accessBoundaryRules"].take()),
        outcome: match record.kind {
            EventKind::Deny => "denied",
            EventKind::Error => "failed",
            _ => "ok",
        },
        code: code_name(record.code),
        cache: record.cache,
        expire_time: record
            .token
            .as_ref()
            .map(|token| humantime::format_rfc3339_seconds(token.expire_time()).to_string()),
        token_sha256: record
            .token
            .as_ref()
            .map(|token| fingerprint(token.secret().expose()))
            .or_else(|| record.handed_back.clone()),
    };
    serde_json::to_string(&line).unwrap_or_else(|_| "{}".to_string())
}

/// The first 16 hex digits of the token's SHA-256.
pub fn fingerprint(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How the request came: `grpc`, `metadata_unix`, `metadata_tcp` or `sink`.
fn transport(rpc: Rpc, caller: &Caller) -> &'static str {
    match (rpc, caller) {
        (_, Caller::Broker) => "sink",
        (Rpc::MetadataToken | Rpc::MetadataIdentity, Caller::Loopback) => "metadata_tcp",
        (Rpc::MetadataToken | Rpc::MetadataIdentity, _) => "metadata_unix",
        _ => "grpc",
    }
}

/// Most lines written at once.
const BATCH_LINES: u64 = 1024;

/// The writer thread's end: the file (or stdout) and how to reopen it.
struct Writer {
    destination: Destination,
    out: Box<dyn Write + Send>,
    dropped: Arc<Dropped>,
    queued: Arc<AtomicUsize>,
    reopen: Arc<AtomicBool>,
    batch: String,
    lines: u64,
}

impl Writer {
    fn open(
        destination: Destination,
        dropped: Arc<Dropped>,
        queued: Arc<AtomicUsize>,
        reopen: Arc<AtomicBool>,
    ) -> Result<Self, AuditError> {
        let out: Box<dyn Write + Send> = match &destination {
            Destination::Stdout => Box::new(io::stdout()),
            Destination::File { path, group } => Box::new(open_file(path, *group)?),
        };
        Ok(Self {
            destination,
            out,
            dropped,
            queued,
            reopen,
            batch: String::new(),
            lines: 0,
        })
    }

    /// Writes lines in batches as they come (a batch whenever the queue is
    /// empty, holds [`BATCH_LINES`] or comes to a reopen), until every
    /// sender is gone.
    fn run(mut self, receiver: Receiver<Message>) {
        while let Ok(message) = receiver.recv() {
            let mut reopen = self.take(message);
            while !reopen
                && self.lines < BATCH_LINES
                && let Ok(message) = receiver.try_recv()
            {
                reopen = self.take(message);
            }
            self.write();
            if reopen || self.reopen.swap(false, Ordering::Acquire) {
                self.reopen_file();
            }
        }
    }

    /// Adds a record to the batch; true for a reopen.
    fn take(&mut self, message: Message) -> bool {
        match message {
            Message::Record(record) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.batch.push_str(&line(&record));
                self.batch.push('\n');
                self.lines += 1;
                false
            }
            Message::Reopen => true,
        }
    }

    /// Writes the batch; lines that could not be written (a full disk) are
    /// counted as dropped.
    fn write(&mut self) {
        if self.lines == 0 {
            return;
        }
        let written = self
            .out
            .write_all(self.batch.as_bytes())
            .and_then(|()| self.out.flush());
        if let Err(error) = written {
            self.dropped
                .count(self.lines, &format!("cannot write the audit log: {error}"));
        }
        self.batch.clear();
        self.lines = 0;
    }

    fn reopen_file(&mut self) {
        let Destination::File { path, group } = &self.destination else {
            return;
        };
        match open_file(path, *group) {
            Ok(file) => {
                self.out = Box::new(file);
                tracing::info!(path = %path.display(), "audit log reopened");
            }
            Err(error) => {
                tracing::error!(%error, "cannot reopen the audit log; writing to the old file")
            }
        }
    }
}

/// Opens `path` for appending (created 0600, or 0640 owned by `group`),
/// never through a symbolic link, in a directory only its owner may change.
fn open_file(path: &Path, group: Option<u32>) -> Result<File, AuditError> {
    let open_error = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(open_error)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(AuditError::UnsafeDirectory {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            mode,
        });
    }
    let file_mode = if group.is_some() { 0o640 } else { 0o600 };
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(file_mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(open_error)?;
    if let Some(gid) = group {
        nix::unistd::fchown(&file, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| open_error(e.into()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o640))
            .map_err(open_error)?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn fingerprints_are_the_first_16_hex_digits_of_sha256() {
        // SHA-256("abc") = ba7816bf8f01cfea...
        assert_eq!(fingerprint("abc"), "ba7816bf8f01cfea");
    }

    #[test]
    fn every_line_is_written_and_the_queue_count_returns_to_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let destination = Destination::File {
            path: path.clone(),
            group: None,
        };
        let audit = AuditLog::open(destination, None, |_| {}).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let audit = audit.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        audit.record(&event(
                            EventKind::Error,
                            Rpc::GetIdToken,
                            &Caller::Loopback,
                            None,
                        ));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let written = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count()
        };
        while written() + (audit.dropped.total.load(Ordering::Relaxed) as usize) < 8000 {
            assert!(Instant::now() < deadline, "{} written", written());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(audit.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reopen_splits_the_lines_where_it_was_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let moved = dir.path().join("audit.log.1");
        let destination = Destination::File {
            path: path.clone(),
            group: None,
        };
        let audit = AuditLog::open(destination, None, |_| {}).unwrap();
        let record = |n| {
            for _ in 0..n {
                audit.record(&event(
                    EventKind::Error,
                    Rpc::GetIdToken,
                    &Caller::Loopback,
                    None,
                ));
            }
        };
        // Queued faster than the writer writes them: many are still in the
        // queue when the file is moved.
        record(3000);
        std::fs::rename(&path, &moved).unwrap();
        audit.reopen();
        record(1000);
        let count = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while count(&moved) + count(&path) < 4000 {
            assert!(
                Instant::now() < deadline,
                "{} written",
                count(&moved) + count(&path)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(audit.dropped.total.load(Ordering::Relaxed), 0);
        assert_eq!((count(&moved), count(&path)), (3000, 1000));
    }

    #[test]
    fn a_directory_others_may_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = open_file(&dir.path().join("audit.log"), None).unwrap_err();
        assert!(
            matches!(error, AuditError::UnsafeDirectory { .. }),
            "{error}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("audit.log");
        open_file(&path, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never through a link.
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_file(&link, None).is_err());
    }
}
