//! systemd integration: socket activation (`LISTEN_FDS`/`LISTEN_PID`) and
//! readiness notification (`sd_notify`).
//!
//! Both protocols need raw file descriptors; the `listenfd` and `sd-notify`
//! crates hold the few lines of `unsafe` code, so this crate stays
//! `#![forbid(unsafe_code)]`.

use std::os::unix::net::UnixListener;

/// The variables of the socket activation protocol.
const LISTEN_PID: &str = "LISTEN_PID";
const LISTEN_FDS: &str = "LISTEN_FDS";

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// More than one socket was passed.
    #[error(
        "systemd passed {0} sockets (LISTEN_FDS); the broker serves exactly one: give tokenbroker.socket a single ListenStream="
    )]
    TooMany(usize),
    /// The passed descriptor is not a listening Unix stream socket.
    #[error(
        "the socket systemd passed (fd 3) is not a Unix stream socket: {0}; use ListenStream=/path in tokenbroker.socket"
    )]
    NotUnixStream(std::io::Error),
}

/// What systemd passed at start.
#[derive(Debug)]
pub enum Activation {
    /// No socket: the broker binds `--socket` itself.
    None,
    /// `LISTEN_FDS` was set for another process (`LISTEN_PID` is not ours):
    /// ignored.
    NotForUs,
    /// The listening socket to serve on.
    Listener(UnixListener),
}

/// Takes the listening socket systemd passed, if the process was socket
/// activated: `LISTEN_FDS=1` and `LISTEN_PID` equal to this process's id.
/// The variables are cleared either way, so children never see them.
///
/// Call it before any other thread starts (it changes the environment).
pub fn take_activated_listener() -> Result<Activation, ActivationError> {
    if std::env::var_os(LISTEN_FDS).is_none() {
        return Ok(Activation::None);
    }
    let ours = std::env::var(LISTEN_PID)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    // Reads the variables and clears them (listenfd itself would also
    // accept a missing LISTEN_PID, which systemd never sends).
    let mut fds = listenfd::ListenFd::from_env();
    if !ours {
        return Ok(Activation::NotForUs);
    }
    match fds.len() {
        0 => Ok(Activation::None),
        1 => match fds.take_unix_listener(0) {
            Ok(Some(listener)) => Ok(Activation::Listener(listener)),
            Ok(None) => Ok(Activation::None),
            Err(error) => Err(ActivationError::NotUnixStream(error)),
        },
        n => Err(ActivationError::TooMany(n)),
    }
}

/// Tells systemd (`Type=notify`) the broker serves. Does nothing outside
/// systemd (no `NOTIFY_SOCKET`).
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready], "READY=1");
}

/// Tells systemd the broker is shutting down.
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping], "STOPPING=1");
}

fn notify(state: &[sd_notify::NotifyState], name: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(state) {
        Ok(()) => tracing::debug!(state = name, "notified systemd"),
        Err(error) => tracing::warn!(state = name, %error, "cannot notify systemd"),
    }
}
