//! Raw HTTP/2 frames, for clients that misbehave on purpose.

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use super::in_time;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

/// One frame: its 9-byte header and `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Takes the whole frames off the front of `buffer`: (type, payload) each.
pub fn take_frames(buffer: &mut Vec<u8>) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while buffer.len() >= 9 {
        let len =
            usize::from(buffer[0]) << 16 | usize::from(buffer[1]) << 8 | usize::from(buffer[2]);
        if buffer.len() < 9 + len {
            break;
        }
        frames.push((buffer[3], buffer[9..9 + len].to_vec()));
        buffer.drain(..9 + len);
    }
    frames
}

/// The frames the server sent on `stream` until it closed the connection.
pub async fn frames_until_closed(mut stream: UnixStream) -> Vec<(u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    in_time(
        "the broker closing the connection",
        stream.read_to_end(&mut bytes),
    )
    .await
    .ok();
    take_frames(&mut bytes)
}
