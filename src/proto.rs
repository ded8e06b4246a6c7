//! The generated gRPC contract (`proto/tokenbroker/v1/tokenbroker.proto`).

pub mod codec;

/// `tokenbroker.v1`: messages, the `TokenBroker` client and server.
#[allow(missing_docs, clippy::doc_markdown)]
pub mod v1 {
    use std::fmt;

    tonic::include_proto!("tokenbroker.v1");

    /// The encoded descriptor set of the contract, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tokenbroker_descriptor.bin"));

    impl From<GetAccessTokenRequest> for watch_token_request::Request {
        fn from(request: GetAccessTokenRequest) -> Self {
            Self::AccessToken(request)
        }
    }

    impl From<GetIdTokenRequest> for watch_token_request::Request {
        fn from(request: GetIdTokenRequest) -> Self {
            Self::IdToken(request)
        }
    }

    impl token::Token {
        /// The credential itself. Never log it.
        pub fn secret(&self) -> &str {
            match self {
                Self::AccessToken(token) => &token.token,
                Self::IdToken(token) => &token.token,
            }
        }

        /// When the token expires, if the broker said (it always does).
        pub fn expire_time(&self) -> Option<std::time::SystemTime> {
            let expire_time = match self {
                Self::AccessToken(token) => token.expire_time,
                Self::IdToken(token) => token.expire_time,
            };
            expire_time.and_then(|t| std::time::SystemTime::try_from(t).ok())
        }
    }

    impl fmt::Debug for AccessToken {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("AccessToken")
                .field("token", &"[redacted]")
                .field("token_type", &self.token_type)
                .field("expire_time", &self.expire_time)
                .finish()
        }
    }

    impl fmt::Debug for InvalidateTokenRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let request: Option<&dyn fmt::Debug> = match &self.request {
                Some(invalidate_token_request::Request::AccessToken(r)) => Some(r),
                Some(invalidate_token_request::Request::IdToken(r)) => Some(r),
                None => None,
            };
            f.debug_struct("InvalidateTokenRequest")
                .field("request", &request)
                .field("token", &"[redacted]")
                .finish()
        }
    }

    impl fmt::Debug for IdToken {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("IdToken")
                .field("token", &"[redacted]")
                .field("expire_time", &self.expire_time)
                .finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::{AccessToken, IdToken, InvalidateTokenRequest, Token, token};

    #[test]
    fn debug_output_never_shows_a_token() {
        let access = AccessToken {
            token: "ya29.secret".into(),
            token_type: "Bearer".into(),
            expire_time: None,
        };
        let id = IdToken {
            token: "eyJ.secret.jwt".into(),
            expire_time: None,
        };
        let wrapped = Token {
            token: Some(token::Token::IdToken(id.clone())),
        };
        let invalidate = InvalidateTokenRequest {
            request: None,
            token: "ya29.secret".into(),
        };
        for printed in [
            format!("{invalidate:?}"),
            format!("{access:?}"),
            format!("{id:?}"),
            format!("{wrapped:?}"),
        ] {
            assert!(!printed.contains("secret"), "{printed}");
            assert!(printed.contains("[redacted]"), "{printed}");
        }
    }
}
