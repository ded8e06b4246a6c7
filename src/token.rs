//! Tokens as the broker holds them: the secret and when it stops being valid.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::secret::Secret;

/// Which of the two credentials a key or token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// An OAuth2 access token (`.../token`).
    Access,
    /// An OIDC ID token (`.../identity`).
    Id,
}

impl TokenKind {
    /// A short, stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Access => "access_token",
            Self::Id => "id_token",
        }
    }
}

/// A credential with its expiry, both as wall-clock time (sent to clients)
/// and on the monotonic clock (used for every decision the broker makes).
#[derive(Clone, Debug)]
pub struct Token {
    secret: Secret,
    token_type: String,
    expire_time: SystemTime,
    expires_at: Instant,
}

impl Token {
    /// A token valid for `lifetime` from `fetched_at` (an access token's
    /// `expires_in`, counted from when the request was sent, so the broker's
    /// idea of the expiry is never later than the server's).
    pub fn expiring_in(
        secret: Secret,
        token_type: String,
        lifetime: Duration,
        fetched_at: (Instant, SystemTime),
    ) -> Self {
        Self {
            secret,
            token_type,
            expire_time: fetched_at.1 + lifetime,
            expires_at: fetched_at.0 + lifetime,
        }
    }

    /// A token that expires at a wall-clock time (an ID token's `exp`).
    pub fn expiring_at(secret: Secret, token_type: String, expire_time: SystemTime) -> Self {
        let remaining = expire_time
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Self {
            secret,
            token_type,
            expire_time,
            expires_at: Instant::now() + remaining,
        }
    }

    /// This token, expiring no later than `other` (a downscoped token and
    /// the token it was exchanged from).
    pub fn no_later_than(mut self, other: &Token) -> Self {
        if other.expires_at < self.expires_at {
            self.expires_at = other.expires_at;
            self.expire_time = other.expire_time;
        }
        self
    }

    /// The credential. Never log it.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// `Bearer` for access tokens; empty for ID tokens.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// The expiry as wall-clock time, for clients.
    pub fn expire_time(&self) -> SystemTime {
        self.expire_time
    }

    /// The expiry on the monotonic clock.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// How long the token stays valid after `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_from_lifetime_is_counted_from_the_fetch() {
        let fetched_at = (Instant::now(), SystemTime::now());
        let token = Token::expiring_in(
            Secret::new("t".into()),
            "Bearer".into(),
            Duration::from_secs(3600),
            fetched_at,
        );
        assert_eq!(token.expires_at(), fetched_at.0 + Duration::from_secs(3600));
        assert_eq!(
            token.expire_time(),
            fetched_at.1 + Duration::from_secs(3600)
        );
        assert_eq!(
            token.remaining(fetched_at.0 + Duration::from_secs(3000)),
            Duration::from_secs(600)
        );
        assert_eq!(
            token.remaining(fetched_at.0 + Duration::from_secs(4000)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_token_is_cut_to_expire_no_later_than_another() {
        let at = (Instant::now(), SystemTime::now());
        let token = |secs| {
            Token::expiring_in(
                Secret::new("t".into()),
                "Bearer".into(),
                Duration::from_secs(secs),
                at,
            )
        };
        let cut = token(7200).no_later_than(&token(3600));
        assert_eq!(cut.expires_at(), at.0 + Duration::from_secs(3600));
        assert_eq!(cut.expire_time(), at.1 + Duration::from_secs(3600));
        let kept = token(600).no_later_than(&token(3600));
        assert_eq!(kept.expires_at(), at.0 + Duration::from_secs(600));
    }

    #[test]
    fn a_past_wall_clock_expiry_is_already_expired() {
        let token = Token::expiring_at(
            Secret::new("t".into()),
            String::new(),
            SystemTime::now() - Duration::from_secs(5),
        );
        assert_eq!(token.remaining(Instant::now()), Duration::ZERO);
    }
}
