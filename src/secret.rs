//! A string that never shows itself: tokens live in [`Secret`] from the moment
//! they are read off the wire until they are written into a response.

use std::fmt;

use zeroize::Zeroizing;

/// A credential (access token or JWT). `Debug` and `Display` print
/// `[redacted]`, and the bytes are zeroed when the value is dropped.
#[derive(Clone, PartialEq, Eq)]
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
}
