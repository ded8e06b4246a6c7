//! One connection's request header blocks: decoded with the client's HPACK
//! state, checked for an `:authority` h2 would refuse, and passed on as they
//! came or re-encoded without it.

use super::hpack::{self, DecodeError, HeaderList};
use super::{HEADER_TABLE_SIZE, MAX_HEADER_LIST_SIZE, REPLACEMENT_AUTHORITY};

/// "Literal header field never indexed, new name" (RFC 7541 §6.2.3).
const LITERAL_NEVER_INDEXED: u8 = 0x10;

/// Why a header block cannot be passed on.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlockError {
    /// The block is not valid HPACK for the client's dynamic table, or its
    /// header list reaches the limit.
    #[error("bad header block: {0}")]
    Hpack(#[from] DecodeError),
    /// With the replacement authority, the list reaches the limit.
    #[error(
        "header list of {0} bytes with \"{REPLACEMENT_AUTHORITY}\" reaches the {MAX_HEADER_LIST_SIZE}-byte limit"
    )]
    TooLarge(usize),
}

/// How a block leaves [`HeaderBlocks::rewrite`].
#[derive(Debug, PartialEq)]
pub enum Rewritten {
    /// Pass the block's frames on byte for byte.
    Unchanged,
    /// Pass on this block instead; it references no dynamic-table entry.
    Encoded(Vec<u8>),
}

/// The HPACK state of one connection's client-to-server direction.
pub struct HeaderBlocks {
    decoder: hpack::Decoder,
    /// The last block's fields, kept to spare allocations.
    list: HeaderList,
    /// Set once a block needed a new authority: from then on every block is
    /// re-encoded, since h2's dynamic table no longer follows the client's.
    reencoding: bool,
}

impl HeaderBlocks {
    /// The state of a new connection.
    pub fn new() -> Self {
        Self {
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            list: HeaderList::default(),
            reencoding: false,
        }
    }

    /// Whether blocks are re-encoded on this connection.
    #[cfg(test)]
    pub fn reencoding(&self) -> bool {
        self.reencoding
    }

    /// Decodes one complete header block (`fragment`) and says how to pass
    /// it on. `Err` leaves the decoder out of step with the client: the
    /// connection cannot go on.
    pub fn rewrite(&mut self, fragment: &[u8]) -> Result<Rewritten, BlockError> {
        let list = &mut self.list;
        self.decoder.decode(fragment, MAX_HEADER_LIST_SIZE, list)?;
        let refused = refused_authorities(list).count();
        let growth = refused * REPLACEMENT_AUTHORITY.len();
        if list.size_bound() + growth >= MAX_HEADER_LIST_SIZE {
            // Only an exact size can tell.
            list.decode_pending(fragment)?;
            if list.size_bound() + growth >= MAX_HEADER_LIST_SIZE {
                return Err(BlockError::TooLarge(list.size_bound() + growth));
            }
        }
        if refused == 0 && !self.reencoding {
            return Ok(Rewritten::Unchanged);
        }
        if !self.reencoding {
            let authority = refused_authorities(list).next().unwrap_or_default();
            tracing::debug!(
                authority = %authority[..authority.len().min(64)].escape_ascii(),
                "a client sent an :authority h2 refuses; this connection's header blocks are re-encoded with \"{REPLACEMENT_AUTHORITY}\""
            );
            self.reencoding = true;
        }
        Ok(Rewritten::Encoded(encode(list.fields(fragment)?)))
    }
}

/// The `:authority` values in `list` that h2 would refuse.
fn refused_authorities(list: &HeaderList) -> impl Iterator<Item = &[u8]> {
    list.authorities()
        .filter(|value| !h2_accepts_authority(value))
}

/// Whether h2 takes `value` as an `:authority`: it must be UTF-8 (else a
/// connection error) and parse as a URI authority (else RST_STREAM).
pub fn h2_accepts_authority(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok() && http::uri::Authority::try_from(value).is_ok()
}

/// Encodes every field as a never-indexed literal, with
/// [`REPLACEMENT_AUTHORITY`] for a refused authority. A re-encoder cannot
/// tell which fields the client marked never-indexed, so it keeps that
/// promise for all; and a literal never enters h2's dynamic table.
fn encode<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let value = if name == b":authority" && !h2_accepts_authority(value) {
            REPLACEMENT_AUTHORITY.as_bytes()
        } else {
            value
        };
        out.push(LITERAL_NEVER_INDEXED);
        hpack::encode_string(name, &mut out);
        hpack::encode_string(value, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_fields(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            out.push(0x00);
            hpack::encode_string(name.as_bytes(), &mut out);
            hpack::encode_string(value.as_bytes(), &mut out);
        }
        out
    }

    fn decoded(block: &[u8]) -> Vec<(String, String)> {
        let mut list = HeaderList::default();
        hpack::Decoder::new(4096)
            .decode(block, usize::MAX, &mut list)
            .unwrap();
        list.fields(block)
            .unwrap()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn h2_accepts_what_http_parses() {
        assert!(h2_accepts_authority(b"localhost"));
        assert!(h2_accepts_authority(b"localhost:50051"));
        assert!(h2_accepts_authority(b"[::1]:80"));
        assert!(!h2_accepts_authority(b"/run/tokenbroker/tokenbroker.sock"));
        assert!(!h2_accepts_authority(b"%2Frun%2Ftokenbroker.sock"));
        assert!(!h2_accepts_authority(b"unix:/run/x.sock"));
        assert!(!h2_accepts_authority(b""));
        assert!(!h2_accepts_authority(b"caf\xc3"));
    }

    #[test]
    fn a_valid_authority_passes_unchanged_until_one_is_refused() {
        let mut blocks = HeaderBlocks::new();
        let good = encode_fields(&[(":method", "POST"), (":authority", "localhost")]);
        assert_eq!(blocks.rewrite(&good), Ok(Rewritten::Unchanged));
        assert!(!blocks.reencoding());

        let bad = encode_fields(&[(":method", "POST"), (":authority", "%2Fx.sock"), ("a", "b")]);
        let Ok(Rewritten::Encoded(block)) = blocks.rewrite(&bad) else {
            panic!("a refused authority is re-encoded");
        };
        assert_eq!(
            decoded(&block),
            [(":method", "POST"), (":authority", "localhost"), ("a", "b")]
                .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        // Never-indexed literals only: nothing enters h2's table.
        assert!(block.starts_with(&[LITERAL_NEVER_INDEXED]));

        // From then on, even a valid block is re-encoded.
        assert!(matches!(blocks.rewrite(&good), Ok(Rewritten::Encoded(_))));
    }

    #[test]
    fn bad_hpack_and_oversized_lists_are_errors() {
        let mut blocks = HeaderBlocks::new();
        assert!(matches!(blocks.rewrite(&[0x80]), Err(BlockError::Hpack(_))));

        let mut blocks = HeaderBlocks::new();
        let big = "v".repeat(MAX_HEADER_LIST_SIZE);
        assert!(matches!(
            blocks.rewrite(&encode_fields(&[("x", &big)])),
            Err(BlockError::Hpack(DecodeError::ListTooLarge(..)))
        ));
    }

    #[test]
    fn the_replacement_counts_against_the_limit() {
        // An empty authority becomes "localhost": 9 more bytes.
        let filler = "v".repeat(MAX_HEADER_LIST_SIZE - 2 * hpack::ENTRY_OVERHEAD - 1 - 10 - 5);
        let block = encode_fields(&[(":authority", ""), ("x", &filler)]);
        let size = ":authority".len() + 1 + filler.len() + 2 * hpack::ENTRY_OVERHEAD;
        assert!(size < MAX_HEADER_LIST_SIZE);
        assert!(size + REPLACEMENT_AUTHORITY.len() >= MAX_HEADER_LIST_SIZE);
        assert!(matches!(
            HeaderBlocks::new().rewrite(&block),
            Err(BlockError::TooLarge(_))
        ));
    }
}
