//! The client-to-server byte stream of one HTTP/2 connection, cut into what
//! passes through untouched (the preface, every frame but a header block)
//! and the header blocks (HEADERS + CONTINUATION), which [`HeaderBlocks`]
//! decides on.

use bytes::{Buf, BufMut, BytesMut};

use super::header_block::{BlockError, HeaderBlocks, Rewritten};
use super::{MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
const HEAD_LEN: usize = 9;
/// CONTINUATION frames h2 accepts in one block at the server's limits
/// (h2's `calc_max_continuation_frames`).
const MAX_CONTINUATIONS: usize = 5;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The PRIORITY fields of a HEADERS frame: stream dependency and weight.
const PRIORITY_LEN: usize = 5;

/// Why a connection is closed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    /// A CONTINUATION frame with no header block open.
    #[error("CONTINUATION frame without HEADERS")]
    StrayContinuation,
    /// A frame other than CONTINUATION (or for another stream) inside a block.
    #[error("a header block of stream {0} was interrupted")]
    Interrupted(u32),
    /// Servers are never pushed to.
    #[error("PUSH_PROMISE from a client")]
    PushPromise,
    /// A header frame larger than the server's SETTINGS_MAX_FRAME_SIZE.
    #[error("header frame of {0} bytes, over the {MAX_FRAME_SIZE}-byte frame limit")]
    FrameTooLarge(usize),
    /// More CONTINUATION frames than h2 takes.
    #[error("more than {MAX_CONTINUATIONS} CONTINUATION frames in one header block")]
    TooManyContinuations,
    /// The encoded block alone reaches the header list limit.
    #[error("header block over {MAX_HEADER_LIST_SIZE} bytes")]
    BlockTooLarge,
    /// Padding or priority fields longer than their frame.
    #[error("HEADERS frame shorter than its padding and priority fields")]
    BadPadding,
    /// The block itself.
    #[error(transparent)]
    Block(#[from] BlockError),
}

/// A frame header (RFC 9113 §4.1).
#[derive(Clone, Copy, Debug)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(bytes: &[u8]) -> Option<Head> {
        let head: &[u8; HEAD_LEN] = bytes.get(..HEAD_LEN)?.try_into().ok()?;
        Some(Head {
            len: usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]),
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        })
    }

    fn write(self, out: &mut BytesMut) {
        out.put_uint(self.len as u64, 3);
        out.put_u8(self.kind);
        out.put_u8(self.flags);
        out.put_u32(self.stream);
    }

    fn is_header_block(self) -> bool {
        matches!(self.kind, HEADERS | CONTINUATION | PUSH_PROMISE)
    }
}

/// Where the scanner is in the client's byte stream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Position {
    /// This many bytes of the preface have passed.
    Preface(usize),
    /// At the start of a frame.
    FrameStart,
    /// Inside a frame that passes untouched, with this many bytes to go.
    Payload(usize),
    /// Not HTTP/2: everything passes, and h2 refuses it.
    NotHttp2,
    /// Refused: nothing more passes.
    Closed,
}

/// Where a scan stopped.
#[derive(Debug, PartialEq)]
enum Stop {
    /// Every byte given passes.
    End,
    /// A header block still arriving (or spanning CONTINUATION frames), or
    /// an incomplete frame header, starts here.
    Hold,
    /// The header block of one frame, `len` bytes, starts here and was
    /// re-encoded: these frames go in its place.
    Replace { len: usize, frames: BytesMut },
    /// What starts here breaks what h2 accepts.
    Refuse(Refusal),
}

/// The opening HEADERS frame of a block.
#[derive(Clone, Copy)]
struct Opening {
    head: Head,
    /// Its PRIORITY fields, when flagged.
    priority: Option<[u8; PRIORITY_LEN]>,
}

/// The client-to-server half of one connection.
pub struct Rewriter {
    position: Position,
    /// Bytes read but not yet passed on: a header block (or frame header)
    /// still arriving, and whatever followed it.
    held: BytesMut,
    /// Bytes ready for h2, which come before anything read later.
    ready: BytesMut,
    blocks: HeaderBlocks,
}

impl Rewriter {
    /// A new connection, before its preface.
    pub fn new() -> Self {
        Self {
            position: Position::Preface(0),
            held: BytesMut::new(),
            ready: BytesMut::new(),
            blocks: HeaderBlocks::new(),
        }
    }

    /// Bytes h2 must read before any other.
    pub fn ready(&self) -> &[u8] {
        &self.ready
    }

    /// Marks `n` bytes of [`Rewriter::ready`] as read.
    pub fn advance_ready(&mut self, n: usize) {
        self.ready.advance(n);
        if self.ready.is_empty() {
            // An idle connection keeps no buffer.
            self.ready = BytesMut::new();
        }
    }

    /// Whether the connection was refused: once [`Rewriter::ready`] is
    /// drained, h2 should see the end of the stream.
    pub fn is_closed(&self) -> bool {
        self.position == Position::Closed
    }

    /// Whether header blocks are re-encoded on this connection.
    #[cfg(test)]
    pub fn reencoding(&self) -> bool {
        self.blocks.reencoding()
    }

    /// Takes bytes just read from the client, which h2 sees only after
    /// [`Rewriter::ready`]. Returns how many leading bytes of `fresh` h2 may
    /// read as they are, in place (only when nothing was ready or held); the
    /// others are kept, and what can be passed of them joins `ready`. When
    /// they break what h2 accepts, the connection is refused (see
    /// [`Rewriter::refuse`]) and the reason returned.
    pub fn accept(&mut self, fresh: &[u8]) -> (usize, Option<Refusal>) {
        if self.position == Position::Closed {
            return (0, None);
        }
        if !self.held.is_empty() || !self.ready.is_empty() {
            self.held.extend_from_slice(fresh);
            return (0, self.process_held().err());
        }
        // The usual case: every byte passes in place, header blocks
        // included, until one needs rewriting or more bytes.
        let (passed, stop) = self.scan(fresh);
        let rest = match stop {
            Stop::End => return (passed, None),
            Stop::Hold => &fresh[passed..],
            Stop::Replace { len, frames } => {
                self.ready = frames;
                &fresh[passed + len..]
            }
            Stop::Refuse(refusal) => {
                self.refuse();
                return (passed, Some(refusal));
            }
        };
        self.held.extend_from_slice(rest);
        (passed, self.process_held().err())
    }

    /// Closes the connection: h2 gets a frame it answers with a connection
    /// error (HEADERS on stream 0: GOAWAY with PROTOCOL_ERROR, as for a
    /// block it could not decode), and nothing after it.
    fn refuse(&mut self) {
        self.position = Position::Closed;
        self.held = BytesMut::new();
        let head = Head {
            len: 0,
            kind: HEADERS,
            flags: END_HEADERS | END_STREAM,
            stream: 0,
        };
        head.write(&mut self.ready);
    }

    /// Passes what it can of the held bytes into `ready`: frames that pass
    /// untouched and each complete header block, rewritten. Refuses the
    /// connection when they break what h2 accepts.
    fn process_held(&mut self) -> Result<(), Refusal> {
        let result = self.pass_held();
        if self.held.is_empty() {
            self.held = BytesMut::new();
        }
        result.inspect_err(|_| self.refuse())
    }

    fn pass_held(&mut self) -> Result<(), Refusal> {
        while !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            let (passed, stop) = self.scan(&held);
            self.held = held;
            self.ready.extend_from_slice(&self.held.split_to(passed));
            match stop {
                Stop::End => {}
                Stop::Replace { len, frames } => {
                    self.held.advance(len);
                    self.ready.extend_from_slice(&frames);
                }
                Stop::Refuse(refusal) => return Err(refusal),
                Stop::Hold => match self.continued_block()? {
                    Some(len) => self.held.advance(len),
                    None => return Ok(()),
                },
            }
        }
        Ok(())
    }

    /// How many leading bytes of `data` pass untouched (header blocks of one
    /// frame included), moving the position past them.
    fn scan(&mut self, data: &[u8]) -> (usize, Stop) {
        let mut at = 0;
        while at < data.len() {
            match self.position {
                Position::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(data.len() - at);
                    if data[at..at + n] != PREFACE[seen..seen + n] {
                        tracing::debug!("not an HTTP/2 client preface; h2 refuses the connection");
                        self.position = Position::NotHttp2;
                        continue;
                    }
                    at += n;
                    self.position = if seen + n == PREFACE.len() {
                        Position::FrameStart
                    } else {
                        Position::Preface(seen + n)
                    };
                }
                Position::FrameStart => {
                    let Some(head) = Head::parse(&data[at..]) else {
                        return (at, Stop::Hold);
                    };
                    if !head.is_header_block() {
                        at += HEAD_LEN;
                        self.position = Position::Payload(head.len);
                        continue;
                    }
                    let frame = data.get(at..at + HEAD_LEN + head.len);
                    match self.single_frame_block(head, frame) {
                        Ok(None) => at += HEAD_LEN + head.len,
                        Ok(Some(frames)) => {
                            let len = HEAD_LEN + head.len;
                            return (at, Stop::Replace { len, frames });
                        }
                        Err(Some(refusal)) => return (at, Stop::Refuse(refusal)),
                        Err(None) => return (at, Stop::Hold),
                    }
                }
                Position::Payload(0) => self.position = Position::FrameStart,
                Position::Payload(left) => {
                    let n = left.min(data.len() - at);
                    at += n;
                    self.position = Position::Payload(left - n);
                }
                Position::NotHttp2 => return (data.len(), Stop::End),
                Position::Closed => return (at, Stop::End),
            }
        }
        if self.position == Position::Payload(0) {
            self.position = Position::FrameStart;
        }
        (at, Stop::End)
    }

    /// Takes a header block that is one whole HEADERS frame (`frame`, when
    /// all of it has arrived): `Ok(None)` if it passes unchanged, or the
    /// frames to send instead. `Err(None)` leaves it to
    /// [`Rewriter::continued_block`]: it spans frames or is incomplete.
    fn single_frame_block(
        &mut self,
        head: Head,
        frame: Option<&[u8]>,
    ) -> Result<Option<BytesMut>, Option<Refusal>> {
        match head.kind {
            HEADERS => {}
            CONTINUATION => return Err(Some(Refusal::StrayContinuation)),
            _ => return Err(Some(Refusal::PushPromise)),
        }
        if head.len > MAX_FRAME_SIZE {
            return Err(Some(Refusal::FrameTooLarge(head.len)));
        }
        let (Some(frame), true) = (frame, head.flags & END_HEADERS != 0) else {
            return Err(None);
        };
        let (opening, fragment) = opening(head, &frame[HEAD_LEN..])?;
        Ok(self.rewrite(opening, fragment)?)
    }

    /// The block at the front of the held bytes that spans CONTINUATION
    /// frames (or has not fully arrived): once all of it is there, passes it
    /// into `ready` and returns its length.
    fn continued_block(&mut self) -> Result<Option<usize>, Refusal> {
        let mut at = 0;
        let mut fragment = Vec::new();
        let mut first: Option<Opening> = None;
        for frame in 0.. {
            let Some(head) = Head::parse(&self.held[at..]) else {
                return Ok(None);
            };
            match first {
                None => {}
                Some(opening)
                    if head.kind == CONTINUATION && head.stream == opening.head.stream => {}
                Some(opening) => return Err(Refusal::Interrupted(opening.head.stream)),
            }
            if frame > MAX_CONTINUATIONS {
                return Err(Refusal::TooManyContinuations);
            }
            if head.len > MAX_FRAME_SIZE {
                return Err(Refusal::FrameTooLarge(head.len));
            }
            let Some(payload) = self.held.get(at + HEAD_LEN..at + HEAD_LEN + head.len) else {
                return Ok(None);
            };
            at += HEAD_LEN + head.len;
            let payload = match first {
                Some(_) => payload,
                None => {
                    let (opening, payload) = opening(head, payload)?;
                    first = Some(opening);
                    payload
                }
            };
            if fragment.len() + payload.len() >= MAX_HEADER_LIST_SIZE {
                return Err(Refusal::BlockTooLarge);
            }
            fragment.extend_from_slice(payload);
            if head.flags & END_HEADERS != 0 {
                break;
            }
        }
        let opening = first.expect("the loop saw the HEADERS frame");
        match self.rewrite(opening, &fragment)? {
            None => self.ready.extend_from_slice(&self.held[..at]),
            Some(frames) => self.ready.extend_from_slice(&frames),
        }
        Ok(Some(at))
    }

    /// Decodes a complete block: `None` if its frames pass as they came, or
    /// the re-encoded block in frames of its own.
    fn rewrite(&mut self, opening: Opening, fragment: &[u8]) -> Result<Option<BytesMut>, Refusal> {
        Ok(match self.blocks.rewrite(fragment)? {
            Rewritten::Unchanged => None,
            Rewritten::Encoded(encoded) => Some(frames(opening, &encoded)),
        })
    }
}

/// Splits a HEADERS frame's payload into its opening (head and priority
/// fields) and its HPACK fragment, without the padding.
fn opening(head: Head, payload: &[u8]) -> Result<(Opening, &[u8]), Refusal> {
    let mut rest = payload;
    let mut pad = 0;
    if head.flags & PADDED != 0 {
        let (&len, after) = rest.split_first().ok_or(Refusal::BadPadding)?;
        pad = usize::from(len);
        rest = after;
    }
    let mut priority = None;
    if head.flags & PRIORITY != 0 {
        let (fields, after) = rest
            .split_first_chunk::<PRIORITY_LEN>()
            .ok_or(Refusal::BadPadding)?;
        priority = Some(*fields);
        rest = after;
    }
    let fragment_len = rest.len().checked_sub(pad).ok_or(Refusal::BadPadding)?;
    Ok((Opening { head, priority }, &rest[..fragment_len]))
}

/// The frames of a re-encoded block: one HEADERS frame (keeping the
/// opening's stream, END_STREAM and priority fields, dropping its padding)
/// and as many CONTINUATION frames as the frame size limit needs.
fn frames(opening: Opening, encoded: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(encoded.len() + 2 * HEAD_LEN + PRIORITY_LEN);
    let stream = opening.head.stream;
    let priority: &[u8] = opening.priority.as_ref().map_or(&[], |fields| fields);
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME_SIZE - priority.len()));
    let mut flags = opening.head.flags & END_STREAM;
    if !priority.is_empty() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let len = priority.len() + first.len();
    Head {
        len,
        kind: HEADERS,
        flags,
        stream,
    }
    .write(&mut out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        let flags = if after.is_empty() { END_HEADERS } else { 0 };
        let len = chunk.len();
        Head {
            len,
            kind: CONTINUATION,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(chunk);
        rest = after;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-encoded block too long for one frame: HEADERS keeps the
    /// stream, END_STREAM and priority fields, CONTINUATION frames carry
    /// the rest, and only the last ends the headers.
    #[test]
    fn a_long_block_is_split_at_the_frame_size() {
        let head = Head {
            len: 0,
            kind: HEADERS,
            flags: END_STREAM | PRIORITY | PADDED,
            stream: 7,
        };
        let fields = [1, 2, 3, 4, 5];
        let encoded: Vec<u8> = (0..2 * MAX_FRAME_SIZE + 10).map(|i| i as u8).collect();
        let out = frames(
            Opening {
                head,
                priority: Some(fields),
            },
            &encoded,
        );

        let mut rest = &out[..];
        let mut heads = Vec::new();
        let mut payload = Vec::new();
        while let Some(head) = Head::parse(rest) {
            let body = &rest[HEAD_LEN..HEAD_LEN + head.len];
            assert!(head.len <= MAX_FRAME_SIZE);
            assert_eq!(head.stream, 7);
            payload.extend_from_slice(body);
            heads.push((head.kind, head.flags));
            rest = &rest[HEAD_LEN + head.len..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            heads,
            [
                (HEADERS, END_STREAM | PRIORITY),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        assert_eq!(payload[..PRIORITY_LEN], fields);
        assert_eq!(payload[PRIORITY_LEN..], encoded);

        let short = frames(
            Opening {
                head,
                priority: None,
            },
            b"abc",
        );
        let short_head = Head::parse(&short).unwrap();
        assert_eq!(
            (short_head.kind, short_head.flags, short_head.len),
            (HEADERS, END_STREAM | END_HEADERS, 3)
        );
        assert_eq!(&short[HEAD_LEN..], b"abc");
    }
}
