//! File permissions as operators write them: octal modes such as `0660`,
//! and users and groups by name or number.

use nix::unistd::{Group, Uid, User};

/// A group by name or number.
pub fn parse_group(value: &str) -> Result<u32, String> {
    if let Ok(gid) = value.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(value) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named {value:?}")),
        Err(error) => Err(format!("cannot look up group {value:?}: {error}")),
    }
}

/// An octal permission mode such as `0660`, at most `0777`.
pub fn parse_mode(value: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(value.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{value:?} is not an octal mode such as 0660"))?;
    if mode > 0o777 {
        return Err(format!("{value:?} is not a permission mode (at most 0777)"));
    }
    Ok(mode)
}

/// A user by name or number.
pub fn parse_user(value: &str) -> Result<Uid, String> {
    if let Ok(uid) = value.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(value) {
        Ok(Some(user)) => Ok(user.uid),
        Ok(None) => Err(format!("no user named {value:?}")),
        Err(error) => Err(format!("cannot look up user {value:?}: {error}")),
    }
}
/// For tests of chown: a uid and gid that are not the test's own (nobody's,
/// 65534) when the test may give files away (as root), so that a check of
/// the owner can fail; else the test's own, the only ones it can set.
#[cfg(test)]
pub fn foreign_owner() -> (Uid, nix::unistd::Gid) {
    if nix::unistd::geteuid().is_root() {
        (Uid::from_raw(65534), nix::unistd::Gid::from_raw(65534))
    } else {
        (nix::unistd::geteuid(), nix::unistd::getegid())
    }
}
