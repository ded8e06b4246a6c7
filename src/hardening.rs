//! Process hardening at start: no core dumps, and no reading of the
//! broker's memory by other processes of its user, since it holds tokens
//! and key material.

use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Why the process could not be hardened.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// `prctl(PR_SET_DUMPABLE, 0)` failed.
    #[error(
        "cannot make the process non-dumpable (prctl PR_SET_DUMPABLE 0): {0}; --allow-core-dumps skips this"
    )]
    Dumpable(Errno),
    /// `setrlimit(RLIMIT_CORE, 0, 0)` failed.
    #[error(
        "cannot set the core file size limit to 0 (setrlimit RLIMIT_CORE): {0}; --allow-core-dumps skips this"
    )]
    CoreLimit(Errno),
}

/// Forbids core dumps: `RLIMIT_CORE` 0 (soft and hard, so it cannot be
/// raised again) and `prctl(PR_SET_DUMPABLE, 0)`, which also makes the
/// process's `/proc` files root's and refuses `ptrace` by its own user.
pub fn forbid_core_dumps() -> Result<(), HardeningError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(HardeningError::CoreLimit)?;
    prctl::set_dumpable(false).map_err(HardeningError::Dumpable)?;
    tracing::debug!(
        rlimit_core = ?getrlimit(Resource::RLIMIT_CORE).ok(),
        dumpable = ?prctl::get_dumpable().ok(),
        "core dumps forbidden: RLIMIT_CORE 0 (soft and hard), PR_SET_DUMPABLE 0"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_dumps_are_forbidden_for_good() {
        // A child process, so the test binary itself stays dumpable.
        if std::env::var_os("TOKENBROKER_HARDENING_CHILD").is_none() {
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "hardening::tests::core_dumps_are_forbidden_for_good",
                ])
                .env("TOKENBROKER_HARDENING_CHILD", "1")
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&child.stdout);
            assert!(
                child.status.success() && said.contains("1 passed"),
                "{said}"
            );
            return;
        }
        forbid_core_dumps().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, 0));
        assert!(!prctl::get_dumpable().unwrap());
    }
}
