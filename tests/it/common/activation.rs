//! Socket activation as systemd does it, for the tests and for
//! `examples/loadgen/restart.rs`: the listening socket as fd 3,
//! `LISTEN_FDS=1`, and `LISTEN_PID` the activated process's own pid.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `program ARGS`, socket-activated with `listener`. `LISTEN_PID` is the
/// program's own pid (a shell exports `$$` and execs the program, which
/// keeps the pid), unless `listen_pid` names another.
pub fn activated<I, S>(
    program: &OsStr,
    args: I,
    listener: &impl AsRawFd,
    listen_pid: Option<&str>,
) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let pid = listen_pid.unwrap_or("$$");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("export LISTEN_PID={pid}; exec \"$0\" \"$@\""))
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", "1");
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork
    // and exec, and the new fd 3 does not have FD_CLOEXEC.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}
