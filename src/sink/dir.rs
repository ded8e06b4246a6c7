//! A sink's directory, opened once without following symbolic links, and
//! the files written relative to it (`openat`, `renameat`, `unlinkat`), so
//! no later change to its path redirects a write.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, unlinkat};

/// Prefix of the temporary files written before the rename.
pub const TEMP_PREFIX: &str = ".tokenbroker-sink-";
/// Random names tried for a temporary file before giving up.
const TEMP_ATTEMPTS: usize = 8;
/// Permission bits that let the group or every user change a directory.
const SHARED_WRITE: u32 = 0o022;

/// Why a sink's directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A component of the path is a symbolic link.
    #[error(
        "directory {}: {} is a symbolic link; sink directories are opened without following links, so name the real directory",
        dir.display(), at.display()
    )]
    Symlink {
        /// The sink's directory.
        dir: PathBuf,
        /// The link.
        at: PathBuf,
    },
    /// A component of the path is not a directory.
    #[error("directory {}: {} is not a directory", dir.display(), at.display())]
    NotADirectory {
        /// The sink's directory.
        dir: PathBuf,
        /// The component.
        at: PathBuf,
    },
    /// A component cannot be opened (missing, no permission).
    #[error(
        "directory {}: cannot open {}: {source} (the directory must exist and be writable by the broker; under systemd add it to ReadWritePaths=)",
        dir.display(), at.display()
    )]
    Open {
        /// The sink's directory.
        dir: PathBuf,
        /// The component.
        at: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The directory belongs to someone else, who could swap its files.
    #[error(
        "directory {} is owned by uid {owner}; it must be owned by the broker's user (uid {broker}) or root, so that nobody else can replace the files in it",
        dir.display()
    )]
    Owner {
        /// The sink's directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// The broker's effective uid.
        broker: u32,
    },
    /// The directory's group or every user may write it.
    #[error(
        "directory {} has mode {mode:04o}, writable by its group or by every user, who could replace the files in it; make it writable by its owner only (chmod go-w)",
        dir.display()
    )]
    Writable {
        /// The sink's directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// The step of writing a file that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Creating the temporary file.
    Create,
    /// Giving it its owner or group.
    Chown,
    /// Giving it its mode.
    Chmod,
    /// Writing and syncing the contents.
    Write,
    /// Renaming it over the final name.
    Rename,
    /// Removing the final name.
    Remove,
}

impl Step {
    /// What was being done, as in "cannot {action}".
    pub fn action(self) -> &'static str {
        match self {
            Step::Create => "create a file in its directory",
            Step::Chown => "set the file's owner or group",
            Step::Chmod => "set the file's mode",
            Step::Write => "write a temporary file",
            Step::Rename => "rename the temporary file into place",
            Step::Remove => "remove the file",
        }
    }
}

/// Writing a file in a [`SinkDir`] failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {}: {source}", step.action())]
pub struct WriteError {
    /// What failed.
    pub step: Step,
    /// The OS error.
    pub source: io::Error,
}

impl WriteError {
    /// The error of `step`, from the OS error it failed with.
    fn at<E: Into<io::Error>>(step: Step) -> impl FnOnce(E) -> WriteError {
        move |error| WriteError {
            step,
            source: error.into(),
        }
    }
}

/// Owner, group and mode of the files written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePerms {
    /// Permission bits.
    pub mode: u32,
    /// The owner, if not the broker's user.
    pub owner: Option<Uid>,
    /// The group, if not the one the file is created with.
    pub group: Option<Gid>,
}

/// A directory held open from start to shutdown: every file is created,
/// renamed and removed relative to it, never through its path again.
#[derive(Debug)]
pub struct SinkDir {
    fd: OwnedFd,
}

impl SinkDir {
    /// Opens the absolute directory `dir` one component at a time from `/`,
    /// refusing a symbolic link anywhere on the way, then checks that it is
    /// owned by `broker` or root and that neither its group nor every user
    /// may write it.
    pub fn open(dir: &Path, broker: Uid) -> Result<Self, DirError> {
        let mut at = PathBuf::from("/");
        let mut fd = openat(AT_FDCWD, "/", dir_flags(), Mode::empty())
            .map_err(|errno| open_error(dir, &at, errno))?;
        for component in dir.components() {
            let name = match component {
                Component::RootDir => continue,
                Component::Normal(name) => name,
                // `..` and `.` are refused with the sink's configuration.
                _ => return Err(open_error(dir, &at, Errno::EINVAL)),
            };
            at.push(name);
            fd = match openat(&fd, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty()) {
                Ok(next) => next,
                Err(errno @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                    let is_link = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|stat| file_type(stat.st_mode) == SFlag::S_IFLNK);
                    return Err(if is_link {
                        DirError::Symlink {
                            dir: dir.to_path_buf(),
                            at,
                        }
                    } else if errno == Errno::ENOTDIR {
                        DirError::NotADirectory {
                            dir: dir.to_path_buf(),
                            at,
                        }
                    } else {
                        open_error(dir, &at, errno)
                    });
                }
                Err(errno) => return Err(open_error(dir, &at, errno)),
            };
        }
        let stat = fstat(&fd).map_err(|errno| open_error(dir, &at, errno))?;
        if stat.st_uid != broker.as_raw() && stat.st_uid != 0 {
            return Err(DirError::Owner {
                dir: dir.to_path_buf(),
                owner: stat.st_uid,
                broker: broker.as_raw(),
            });
        }
        let mode = stat.st_mode & 0o7777;
        if mode & SHARED_WRITE != 0 {
            return Err(DirError::Writable {
                dir: dir.to_path_buf(),
                mode,
            });
        }
        Ok(Self { fd })
    }

    /// Replaces the file `name` with `contents` atomically: a temporary
    /// file is created exclusively (never through a link), given `perms`
    /// before any content, written, synced, and renamed over `name`.
    pub fn replace(
        &self,
        name: &OsStr,
        contents: &[u8],
        perms: FilePerms,
    ) -> Result<(), WriteError> {
        let (temp, mut file) = self.temp_file(perms)?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(WriteError::at(Step::Write))?;
        renameat(&self.fd, temp.name(), &self.fd, name).map_err(WriteError::at(Step::Rename))?;
        temp.renamed();
        Ok(())
    }

    /// Creates a temporary file with `perms` and removes it: checks, before
    /// any token, that files can be written here as configured.
    pub fn probe(&self, perms: FilePerms) -> Result<(), WriteError> {
        self.temp_file(perms).map(drop)
    }

    /// Removes the file `name`; `false` if there was none.
    pub fn remove(&self, name: &OsStr) -> Result<bool, WriteError> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(errno) => Err(WriteError::at(Step::Remove)(errno)),
        }
    }

    /// An empty temporary file with its final owner, group and mode; it is
    /// removed again unless renamed.
    fn temp_file(&self, perms: FilePerms) -> Result<(TempName<'_>, File), WriteError> {
        let (temp, file) = self.create_temp()?;
        if perms.owner.is_some() || perms.group.is_some() {
            std::os::unix::fs::fchown(
                &file,
                perms.owner.map(Uid::as_raw),
                perms.group.map(Gid::as_raw),
            )
            .map_err(WriteError::at(Step::Chown))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(perms.mode))
            .map_err(WriteError::at(Step::Chmod))?;
        Ok((temp, file))
    }

    fn create_temp(&self) -> Result<(TempName<'_>, File), WriteError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut last = Errno::EEXIST;
        for _ in 0..TEMP_ATTEMPTS {
            let name = temp_name();
            match openat(
                &self.fd,
                name.as_os_str(),
                flags,
                Mode::S_IRUSR | Mode::S_IWUSR,
            ) {
                Ok(fd) => {
                    let temp = TempName {
                        dir: self,
                        name: Some(name),
                    };
                    return Ok((temp, File::from(fd)));
                }
                Err(Errno::EEXIST) => last = Errno::EEXIST,
                Err(errno) => {
                    last = errno;
                    break;
                }
            }
        }
        Err(WriteError::at(Step::Create)(last))
    }
}

/// A temporary file's name, unlinked on drop unless it was renamed.
struct TempName<'a> {
    dir: &'a SinkDir,
    name: Option<OsString>,
}

impl TempName<'_> {
    fn name(&self) -> &OsStr {
        self.name.as_deref().unwrap_or_default()
    }

    fn renamed(mut self) {
        self.name = None;
    }
}

impl Drop for TempName<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = unlinkat(
                self.dir.fd.as_fd(),
                name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

fn dir_flags() -> OFlag {
    // O_PATH: only search permission is needed along the way.
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

fn file_type(mode: u32) -> SFlag {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits())
}

fn open_error(dir: &Path, at: &Path, errno: Errno) -> DirError {
    DirError::Open {
        dir: dir.to_path_buf(),
        at: at.to_path_buf(),
        source: errno.into(),
    }
}

fn temp_name() -> OsString {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(12)
        .collect();
    OsString::from(format!("{TEMP_PREFIX}{suffix}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    fn me() -> Uid {
        nix::unistd::geteuid()
    }

    fn perms(mode: u32) -> FilePerms {
        FilePerms {
            mode,
            owner: None,
            group: None,
        }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_land_in_the_directory_opened_even_after_its_path_is_swapped() {
        let root = tempfile::tempdir().unwrap();
        let original = root.path().join("sinks");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&original).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        let dir = SinkDir::open(&original, me()).unwrap();
        dir.replace(OsStr::new("token"), b"first", perms(0o600))
            .unwrap();

        // The path now leads elsewhere; the open directory does not.
        let moved = root.path().join("moved");
        std::fs::rename(&original, &moved).unwrap();
        symlink(&elsewhere, &original).unwrap();
        dir.replace(OsStr::new("token"), b"second", perms(0o600))
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(moved.join("token")).unwrap(),
            "second"
        );
        assert!(names(&elsewhere).is_empty(), "{:?}", names(&elsewhere));
        assert!(dir.remove(OsStr::new("token")).unwrap());
        assert!(names(&moved).is_empty());
        assert!(names(&elsewhere).is_empty());
        assert!(!dir.remove(OsStr::new("token")).unwrap(), "already gone");
    }

    #[test]
    fn replace_sets_the_mode_and_owner_and_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let dir = SinkDir::open(root.path(), me()).unwrap();
        let (uid, gid) = crate::permissions::foreign_owner();
        let perms = FilePerms {
            mode: 0o640,
            owner: Some(uid),
            group: Some(gid),
        };
        dir.replace(OsStr::new("token"), b"one", perms).unwrap();
        let inode = std::fs::metadata(root.path().join("token")).unwrap().ino();
        dir.replace(OsStr::new("token"), b"two", perms).unwrap();
        let meta = std::fs::metadata(root.path().join("token")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid.as_raw(), gid.as_raw()));
        assert_ne!(meta.ino(), inode, "replaced by rename, not rewritten");
        assert_eq!(names(root.path()), ["token"]);
        dir.probe(perms).unwrap();
        assert_eq!(names(root.path()), ["token"], "the probe cleans up");
    }

    #[test]
    fn a_failed_write_removes_its_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("token")).unwrap();
        let dir = SinkDir::open(root.path(), me()).unwrap();
        let error = dir
            .replace(OsStr::new("token"), b"t", perms(0o600))
            .unwrap_err();
        assert_eq!(error.step, Step::Rename);
        assert_eq!(names(root.path()), ["token"]);
    }

    #[test]
    fn a_symbolic_link_anywhere_on_the_path_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir_all(real.join("sinks")).unwrap();
        symlink(&real, root.path().join("link")).unwrap();
        for path in [root.path().join("link/sinks"), root.path().join("link")] {
            let error = SinkDir::open(&path, me()).unwrap_err();
            assert!(
                matches!(&error, DirError::Symlink { at, .. } if at == &root.path().join("link"))
            );
            let message = error.to_string();
            assert!(message.contains("is a symbolic link"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        for mode in [0o770, 0o757, 0o1777, 0o720] {
            chmod(root.path(), mode);
            let error = SinkDir::open(root.path(), me()).unwrap_err();
            assert!(matches!(error, DirError::Writable { mode: m, .. } if m == mode));
            assert!(
                error.to_string().contains(&format!("mode {mode:04o}")),
                "{error}"
            );
        }
        for mode in [0o700, 0o750, 0o755, 0o711] {
            chmod(root.path(), mode);
            SinkDir::open(root.path(), me()).unwrap();
        }
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let root = tempfile::tempdir().unwrap();
        // As root, give the directory away; otherwise pretend to be a
        // broker with another uid.
        let broker = if me().is_root() {
            std::os::unix::fs::chown(root.path(), Some(65534), None).unwrap();
            Uid::from_raw(1)
        } else {
            Uid::from_raw(me().as_raw() + 1)
        };
        let error = SinkDir::open(root.path(), broker).unwrap_err();
        assert!(matches!(error, DirError::Owner { .. }), "{error}");
        let message = error.to_string();
        assert!(message.contains("is owned by uid"), "{message}");
        assert!(message.contains(&format!("(uid {broker})")), "{message}");
        // Root's directories are fine for any broker.
        SinkDir::open(Path::new("/"), broker).unwrap();
    }

    #[test]
    fn a_missing_directory_or_a_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("missing/sinks");
        let message = SinkDir::open(&missing, me()).unwrap_err().to_string();
        assert!(message.contains("directory must exist"), "{message}");
        assert!(message.contains("missing"), "{message}");
        std::fs::write(root.path().join("file"), "").unwrap();
        let error = SinkDir::open(&root.path().join("file"), me()).unwrap_err();
        assert!(matches!(error, DirError::NotADirectory { .. }), "{error}");
    }
}
