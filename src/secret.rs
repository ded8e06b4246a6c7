//! A string that never shows itself: tokens live in [`Secret`] from the moment
//! they are read off the wire until they are written into a response.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A credential (access token or JWT). `Debug` and `Display` print
/// `[redacted]`, the bytes are zeroed when the value is dropped, and two
/// are compared in time that does not depend on where they differ.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The credential itself, for writing into a response. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Comparing a presented token with a held one (InvalidateToken) must not
/// tell a local attacker, by its timing, how much of a guess was right.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("ya29.very-secret".to_string());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(secret.expose(), "ya29.very-secret");
    }

    #[test]
    fn secrets_equal_only_byte_for_byte() {
        let secret = Secret::new("ya29.abc".to_string());
        assert!(secret == Secret::new("ya29.abc".to_string()));
        assert!(secret != Secret::new("ya29.abd".to_string()));
        assert!(secret != Secret::new("ya29.ab".to_string()));
        assert!(secret != Secret::new(String::new()));
    }
}
