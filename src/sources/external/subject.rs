//! The subject token of an external account, read again at every exchange
//! (Kubernetes, CI systems and identity agents rotate it): from a file, an
//! HTTP GET, or a program ([`super::executable`]).

use std::path::Path;

use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::error::FetchError;
use crate::secret::Secret;
use crate::sources::credentials::external::{ExternalAccount, SubjectFormat, SubjectSource};
use crate::sources::external::{aws, executable};
use crate::sources::https::HttpsClient;
use crate::sources::response::{MAX_RESPONSE_BYTES, check_printable};

/// Where `account`'s subject token comes from, in words (a URL without
/// its query).
pub fn describe(account: &ExternalAccount) -> String {
    match &account.subject {
        SubjectSource::File { path, .. } => format!("the file {}", path.display()),
        SubjectSource::Url { url, .. } => format!(
            "{}://{}{}",
            url.scheme_str().unwrap_or("https"),
            url.authority().map_or("", |a| a.as_str()),
            url.path()
        ),
        SubjectSource::Executable(program) => format!("the program {}", program.command[0]),
        SubjectSource::Aws(_) => "AWS (a signed GetCallerIdentity request)".to_string(),
    }
}

/// `account`'s current subject token, through `http` for a URL source.
pub async fn read(account: &ExternalAccount, http: &HttpsClient) -> Result<Secret, FetchError> {
    match &account.subject {
        SubjectSource::File { path, format } => {
            let content = read_file(path).await?;
            extract(format, &content, "the subject-token file")
        }
        SubjectSource::Url {
            url,
            headers,
            format,
        } => {
            let body = http
                .fetch("the subject-token URL", http::Method::GET, url, headers)
                .await?;
            extract(format, &body, "the subject-token URL")
        }
        SubjectSource::Executable(program) => executable::run(program, account).await,
        SubjectSource::Aws(source) => {
            aws::subject_token(
                source,
                &account.audience,
                http,
                &aws::Environment::from_process(),
            )
            .await
        }
    }
}

/// The file's content, at most [`MAX_RESPONSE_BYTES`]. A missing or
/// unreadable file is a transient fault: it may be in the middle of a
/// rotation.
async fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, FetchError> {
    let content = read_bounded(path).await.map_err(|e| {
        FetchError::Connect(format!("the subject-token file {}: {e}", path.display()))
    })?;
    content.ok_or_else(|| {
        FetchError::Malformed(format!(
            "the subject-token file {} is larger than {MAX_RESPONSE_BYTES} bytes",
            path.display()
        ))
    })
}

/// A regular file's content if it holds at most [`MAX_RESPONSE_BYTES`]
/// (`None` if more), into a buffer that never moves and is zeroed on drop.
/// Anything but a regular file (a FIFO would block) is an error.
pub async fn read_bounded(path: &Path) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
    if !tokio::fs::metadata(path).await?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = tokio::fs::File::open(path).await?;
    let mut content = Zeroizing::new(Vec::with_capacity(MAX_RESPONSE_BYTES + 1));
    file.take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut content)
        .await?;
    Ok((content.len() <= MAX_RESPONSE_BYTES).then_some(content))
}

/// The token in `content`, as `format` says it sits there. `what` names
/// the source in errors, which never hold the content.
pub fn extract(format: &SubjectFormat, content: &[u8], what: &str) -> Result<Secret, FetchError> {
    let malformed = |problem: &str| FetchError::Malformed(format!("{what}: {problem}"));
    let token = match format {
        SubjectFormat::Text => std::str::from_utf8(content)
            .map_err(|_| malformed("not UTF-8 text"))?
            .trim()
            .to_string(),
        SubjectFormat::Json { field } => {
            let value: serde_json::Value = serde_json::from_slice(content)
                .map_err(|_| malformed("not JSON, though its format says json"))?;
            value[field.as_str()]
                .as_str()
                .ok_or_else(|| malformed(&format!("no string field \"{field}\"")))?
                .to_string()
        }
    };
    if token.is_empty() {
        return Err(malformed("empty"));
    }
    check_printable("the subject token", &token)?;
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_text_and_json() {
        let text = extract(&SubjectFormat::Text, b"  eyJ.token.sig\n", "f").unwrap();
        assert_eq!(text.expose(), "eyJ.token.sig");
        let json = SubjectFormat::Json {
            field: "access_token".into(),
        };
        let token = extract(&json, br#"{"access_token":"tok","other":1}"#, "f").unwrap();
        assert_eq!(token.expose(), "tok");
        for (format, content) in [
            (&SubjectFormat::Text, &b"   \n"[..]),
            (&SubjectFormat::Text, b"\xff\xfe"),
            (&json, b"eyJ.secret-subject"),
            (&json, br#"{"access_token": 5, "x": "secret-subject"}"#),
            (&json, br#"{"other": "secret-subject"}"#),
        ] {
            let error = extract(format, content, "the subject-token file /t").unwrap_err();
            let message = error.to_string();
            assert!(message.contains("/t"), "{message}");
            assert!(!message.contains("secret-subject"), "{message}");
        }
    }
}
