//! An executable subject-token source: a program the operator names, run
//! without a shell, with the environment Google's libraries give it, its
//! JSON answer checked (`version`, `success`, `token_type`, `id_token` or
//! `saml_response`, `expiration_time`, `code`/`message`), and its output
//! file read first while the answer in it is still valid.

use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::error::FetchError;
use crate::secret::Secret;
use crate::sources::credentials::external::{Executable, ExternalAccount};
use crate::sources::external::subject::read_bounded;
use crate::sources::response::{MAX_RESPONSE_BYTES, check_printable};

/// The only response version there is.
const VERSION: u64 = 1;
/// Longest error explanation kept from a program, in characters.
const MAX_MESSAGE_CHARS: usize = 200;

/// The program's answer, as Google documents it.
#[derive(Deserialize)]
struct Response {
    version: Option<u64>,
    success: Option<bool>,
    token_type: Option<String>,
    id_token: Option<String>,
    saml_response: Option<String>,
    /// Seconds since the epoch; Google's libraries take a float too.
    expiration_time: Option<f64>,
    code: Option<String>,
    message: Option<String>,
}

/// The subject token: from the output file if it holds a valid one, else
/// from running the program.
pub async fn run(program: &Executable, account: &ExternalAccount) -> Result<Secret, FetchError> {
    let name = &program.command[0];
    if let Some(path) = &program.output_file
        && let Ok(Some(content)) = read_bounded(path).await
        && let Ok(token) = parse(&content, true, name)
    {
        return Ok(token);
    }
    let mut command = tokio::process::Command::new(name);
    command
        .args(&program.command[1..])
        .env("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", &account.audience)
        .env(
            "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE",
            &account.subject_token_type,
        )
        .env("GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its complaints may quote a credential: not copied to the logs.
        .stderr(Stdio::null())
        // Its own process group, so that a timeout kills what it started.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(impersonation) = &account.impersonation {
        command.env(
            "GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL",
            &impersonation.url.target,
        );
    }
    if let Some(path) = &program.output_file {
        command.env("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE", path);
    }
    let failed =
        |e: std::io::Error| FetchError::Connect(format!("the subject-token program {name}: {e}"));
    let mut child = command.spawn().map_err(failed)?;
    let mut group = GroupKiller(child.id().map(|pid| Pid::from_raw(pid as i32)));
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed(std::io::ErrorKind::BrokenPipe.into()))?;
    let run = async {
        // At most one byte more than an answer may have: a program that
        // prints more is not read further (and is killed on return).
        let mut output = zeroize::Zeroizing::new(Vec::with_capacity(MAX_RESPONSE_BYTES + 1));
        (&mut stdout)
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut output)
            .await?;
        if output.len() > MAX_RESPONSE_BYTES {
            return Ok((None, output));
        }
        Ok::<_, std::io::Error>((Some(child.wait().await?), output))
    };
    let (status, output) = tokio::time::timeout(program.timeout, run)
        .await
        .map_err(|_| FetchError::Timeout(program.timeout))?
        .map_err(failed)?;
    let Some(status) = status else {
        return Err(FetchError::Malformed(format!(
            "the subject-token program {name} printed more than {MAX_RESPONSE_BYTES} bytes"
        )));
    };
    // It exited by itself: its group is its own business now.
    group.0 = None;
    if !status.success() {
        return Err(FetchError::Malformed(format!(
            "the subject-token program {name} {status}"
        )));
    }
    parse(&output, program.output_file.is_some(), name)
}

/// Kills a program's process group when dropped before it exited (on
/// timeout, or when the fetch is cancelled), so that nothing it started
/// lingers.
struct GroupKiller(Option<Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // It may be gone already; nothing else to do then.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Checks a program's answer. `needs_expiry`: with an output file, the
/// answer must say when it expires, so the file can be trusted later.
fn parse(content: &[u8], needs_expiry: bool, name: &str) -> Result<Secret, FetchError> {
    let malformed = |problem: &str| {
        FetchError::Malformed(format!("the subject-token program {name}: {problem}"))
    };
    if content.len() > MAX_RESPONSE_BYTES {
        return Err(malformed("its answer is too large"));
    }
    let response: Response = serde_json::from_slice(content)
        .map_err(|_| malformed("its answer is not the executable-response JSON"))?;
    if response.version != Some(VERSION) {
        return Err(malformed("its answer's version is not 1"));
    }
    match response.success {
        Some(true) => {}
        Some(false) => {
            let text = |field: Option<String>| {
                field
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_MESSAGE_CHARS)
                    .collect::<String>()
            };
            return Err(malformed(&format!(
                "it failed: {}: {}",
                text(response.code),
                text(response.message)
            )));
        }
        None => return Err(malformed("its answer has no success field")),
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    match response.expiration_time {
        Some(expiry) if expiry <= now => return Err(malformed("its token has expired")),
        None if needs_expiry => {
            return Err(malformed(
                "its answer has no expiration_time, which an output_file needs",
            ));
        }
        _ => {}
    }
    let token = match response.token_type.as_deref() {
        Some(
            "urn:ietf:params:oauth:token-type:jwt" | "urn:ietf:params:oauth:token-type:id_token",
        ) => response.id_token,
        Some("urn:ietf:params:oauth:token-type:saml2") => response.saml_response,
        _ => return Err(malformed("its token_type is not jwt, id_token or saml2")),
    }
    .ok_or_else(|| malformed("its answer lacks the token its token_type names"))?;
    check_printable("the subject token", &token)?;
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn answer(value: serde_json::Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn answers_are_checked_as_google_documents_them() {
        let later = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let good = json!({"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "eyJ.a.b", "expiration_time": later});
        assert_eq!(
            parse(&answer(good.clone()), true, "/p").unwrap().expose(),
            "eyJ.a.b"
        );
        let saml = json!({"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:saml2", "saml_response": "PHNhbWw+"});
        assert_eq!(
            parse(&answer(saml), false, "/p").unwrap().expose(),
            "PHNhbWw+"
        );
        let mut no_expiry = good.clone();
        no_expiry.as_object_mut().unwrap().remove("expiration_time");
        assert!(parse(&answer(no_expiry.clone()), false, "/p").is_ok());
        let cases = [
            (no_expiry, "expiration_time"),
            (json!({"version": 2, "success": true}), "version"),
            (
                json!({"version": 1, "success": false, "code": "401", "message": "denied\nhere"}),
                "it failed: 401: deniedhere",
            ),
            (
                json!({"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "eyJ.secret", "expiration_time": 5}),
                "expired",
            ),
            (
                json!({"version": 1, "success": true, "token_type": "bogus", "id_token": "eyJ.secret", "expiration_time": later}),
                "token_type",
            ),
            (
                json!({"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:saml2", "id_token": "eyJ.secret", "expiration_time": later}),
                "lacks the token",
            ),
        ];
        for (value, needle) in cases {
            let message = parse(&answer(value), true, "/p").unwrap_err().to_string();
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            assert!(
                message.contains("/p") && !message.contains("secret"),
                "{message}"
            );
        }
        assert!(
            parse(b"eyJ.secret", false, "/p")
                .unwrap_err()
                .to_string()
                .contains("not the executable-response JSON")
        );
    }
}
