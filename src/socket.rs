//! The broker's Unix socket: where it lives, and binding it so that exactly
//! one broker serves a path, stale sockets are replaced, and the socket
//! never exists with looser permissions than asked for.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use tokio::net::UnixListener;

/// Where the broker listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tokenbroker/tokenbroker.sock";
/// Default socket permissions: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Longest socket path Linux accepts (`sun_path` holds 108 bytes with NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process serves this path.
    #[error("another broker is already serving {0}; stop it first or choose another --socket")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The lock file is not a regular file of the broker's user.
    #[error(
        "refusing lock file {}: {reason}; remove it, or choose another --socket",
        path.display()
    )]
    UnsafeLock {
        /// The lock file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The path does not fit in a socket address.
    #[error(
        "socket path {path} is too long ({len} bytes with the staging name the broker binds through first); Unix sockets allow at most {MAX_SOCKET_PATH}"
    )]
    PathTooLong {
        /// The path asked for.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// A file-system operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io {
        action,
        path,
        source,
    }
}

/// A bound, listening socket; dropping [`SocketOwner`] removes it.
pub struct BoundSocket {
    /// Accepts client connections.
    pub listener: UnixListener,
    /// Removes the socket file when dropped.
    pub owner: SocketOwner,
}

/// Holds the path's lock for the broker's lifetime and removes the socket
/// file on drop (if it is still the one this broker created). A socket
/// inherited from systemd is systemd's: it is neither locked nor removed.
pub struct SocketOwner {
    path: PathBuf,
    inode: (u64, u64),
    /// The path's lock; `None` for an inherited socket.
    lock: Option<File>,
}

impl SocketOwner {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The group whose members may connect: the socket's group, if its
    /// mode lets the group write (connect) and the socket can be inspected.
    pub fn client_group(&self) -> Option<u32> {
        let meta = fs::metadata(&self.path).ok()?;
        (meta.mode() & 0o020 != 0).then_some(meta.gid())
    }
}

impl Drop for SocketOwner {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return;
        }
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.inode);
        if ours && let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove socket");
        }
    }
}

/// Binds `path` with permissions `mode` (and group `group`, if given),
/// creating parent directories.
///
/// A lock file beside the socket (`PATH.lock`) makes sure one broker owns the
/// path. The socket is bound inside a private (0700) directory, given its
/// mode, then renamed into place, so no client can connect before the
/// permissions are final; the rename also replaces a stale socket left by a
/// broker that died.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<BoundSocket, SocketError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let staging = parent.join(format!(".tb-{:08x}", fastrand::u32(..)));
    let staged = staging.join("s");
    let len = path.as_os_str().len().max(staged.as_os_str().len());
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    fs::create_dir_all(parent).map_err(io_error("create directory", parent))?;
    let lock = acquire_lock(path)?;
    check_existing(path)?;

    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_error("create directory", &staging))?;
    let result = bind_in(&staged, path, mode, group);
    let _ = fs::remove_dir_all(&staging);
    let listener = result?;

    let meta = fs::symlink_metadata(path).map_err(io_error("inspect", path))?;
    Ok(BoundSocket {
        listener,
        owner: SocketOwner {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            lock: Some(lock),
        },
    })
}

/// Serves on a listening socket inherited from systemd (socket
/// activation). Its path, mode and owner are the socket unit's business,
/// and it is left in place on shutdown.
pub fn inherited(listener: std::os::unix::net::UnixListener) -> Result<BoundSocket, SocketError> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("(inherited socket)"));
    listener
        .set_nonblocking(true)
        .map_err(io_error("configure", &path))?;
    let listener = UnixListener::from_std(listener).map_err(io_error("listen on", &path))?;
    Ok(BoundSocket {
        listener,
        owner: SocketOwner {
            path,
            inode: (0, 0),
            lock: None,
        },
    })
}

/// Opens and locks `PATH.lock`: never through a symbolic link (`O_NOFOLLOW`),
/// and only a regular file owned by the broker's user (another user's
/// file could be held, or swapped, by them).
fn acquire_lock(path: &Path) -> Result<File, SocketError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let refuse = |reason: String| SocketError::UnsafeLock {
        path: lock_path.clone(),
        reason,
    };
    // O_NONBLOCK: a FIFO in the way fails (or opens) at once, not blocks.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(&lock_path)
        .map_err(|error| match error.raw_os_error() {
            Some(code) if code == Errno::ELOOP as i32 => {
                refuse("it is a symbolic link, which the broker does not follow".into())
            }
            _ => io_error("open lock file", &lock_path)(error),
        })?;
    let meta = lock
        .metadata()
        .map_err(io_error("inspect lock file", &lock_path))?;
    if !meta.file_type().is_file() {
        return Err(refuse("it is not a regular file".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by the broker's user (uid {me})",
            meta.uid()
        )));
    }
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(SocketError::InUse(path.to_path_buf())),
        Err(fs::TryLockError::Error(source)) => Err(SocketError::Io {
            action: "lock",
            path: lock_path,
            source,
        }),
    }
}

/// Refuses to start over a live socket or a file that is not a socket.
fn check_existing(path: &Path) -> Result<(), SocketError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error("inspect", path)(error)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket");
            Ok(())
        }
        Err(error) => Err(io_error("probe", path)(error)),
    }
}

fn bind_in(
    staged: &Path,
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<UnixListener, SocketError> {
    let listener =
        std::os::unix::net::UnixListener::bind(staged).map_err(io_error("bind", staged))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(staged, None, Some(gid))
            .map_err(io_error("set the group of", staged))?;
    }
    fs::set_permissions(staged, fs::Permissions::from_mode(mode))
        .map_err(io_error("set permissions of", staged))?;
    fs::rename(staged, path).map_err(io_error("move socket to", path))?;
    listener
        .set_nonblocking(true)
        .map_err(io_error("configure", path))?;
    UnixListener::from_std(listener).map_err(io_error("listen on", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_the_mode_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/broker.sock");
        let gid = crate::permissions::foreign_owner().1.as_raw();
        let bound = bind(&path, 0o600, Some(gid)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.gid(), gid);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with(".tb-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(bound.owner.client_group(), None, "mode 0600: no group");
        drop(bound);
        assert!(!path.exists());
        let bound = bind(&path, 0o660, Some(gid)).unwrap();
        assert_eq!(bound.owner.client_group(), Some(gid));
    }

    #[tokio::test]
    async fn a_second_broker_on_the_same_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let _first = bind(&path, DEFAULT_SOCKET_MODE, None).unwrap();
        assert!(matches!(
            bind(&path, DEFAULT_SOCKET_MODE, None),
            Err(SocketError::InUse(_))
        ));
        assert!(path.exists());
    }

    #[tokio::test]
    async fn a_live_socket_of_another_program_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            bind(&path, DEFAULT_SOCKET_MODE, None),
            Err(SocketError::InUse(_))
        ));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let bound = bind(&path, DEFAULT_SOCKET_MODE, None).unwrap();
        UnixStream::connect(&path).expect("new socket accepts connections");
        drop(bound);
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind(&path, DEFAULT_SOCKET_MODE, None),
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_symbolic_link_at_the_lock_path_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join("broker.sock.lock")).unwrap();
        let error = bind(&path, DEFAULT_SOCKET_MODE, None).err().unwrap();
        assert!(matches!(error, SocketError::UnsafeLock { .. }), "{error}");
        assert!(error.to_string().contains("is a symbolic link"), "{error}");
        assert!(!target.exists(), "the link was not followed");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_lock_file_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: cannot give a file to another user; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        let lock = dir.path().join("broker.sock.lock");
        fs::write(&lock, "").unwrap();
        std::os::unix::fs::chown(&lock, Some(65534), None).unwrap();
        let error = bind(&path, DEFAULT_SOCKET_MODE, None).err().unwrap();
        let message = error.to_string();
        assert!(
            message.contains("is owned by uid 65534, not by the broker's user (uid 0)"),
            "{message}"
        );
        assert!(!path.exists());
        // The broker's own leftover lock file is reused.
        std::os::unix::fs::chown(&lock, Some(0), None).unwrap();
        drop(bind(&path, DEFAULT_SOCKET_MODE, None).unwrap());
    }

    #[tokio::test]
    async fn a_lock_path_that_is_not_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sock");
        nix::unistd::mkfifo(
            &dir.path().join("broker.sock.lock"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        let error = bind(&path, DEFAULT_SOCKET_MODE, None).err().unwrap();
        assert!(error.to_string().contains("lock"), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn overlong_paths_are_refused_up_front() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(
            bind(&path, DEFAULT_SOCKET_MODE, None),
            Err(SocketError::PathTooLong { .. })
        ));
        // Short enough itself, but not the staging path in its directory.
        let path = PathBuf::from(format!("/tmp/{}/s", "d".repeat(96)));
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(matches!(
            bind(&path, DEFAULT_SOCKET_MODE, None),
            Err(SocketError::PathTooLong { .. })
        ));
        assert!(!path.parent().unwrap().exists(), "nothing created");
    }
}
