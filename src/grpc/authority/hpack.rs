//! HPACK (RFC 7541) for the client's header blocks: a decoder that keeps
//! the dynamic table in step with the client's encoder, exactly as the
//! server's own decoder does, and an encoder of literals that never touch
//! the server's table.
//!
//! Written here, rather than taken from loona-hpack, because that crate
//! rebuilds a hash-map Huffman table for every string it decodes (about
//! 16 µs each); h2 never indexes `:path`, so every tonic request paid it,
//! halving the broker's throughput. Huffman strings are decoded with
//! httlib-huffman's table-driven decoder.

use std::collections::VecDeque;
use std::ops::Range;

use httlib_huffman::DecoderSpeed;

/// What each table entry and header field counts beyond its name and value
/// (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;
/// The most bytes an integer may take, as h2 allows.
const MAX_INTEGER_BYTES: usize = 5;

/// Why a block cannot be decoded. Any of these leaves the decoder out of
/// step with the client: the connection cannot go on.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The block ends inside a field.
    #[error("header block ends inside a field")]
    Truncated,
    /// An integer longer than h2 accepts.
    #[error("integer too long")]
    IntegerTooLong,
    /// A table index that names no entry.
    #[error("no table entry {0}")]
    NoSuchEntry(usize),
    /// A Huffman string that does not decode.
    #[error("bad Huffman string")]
    Huffman,
    /// A table size over what the server allows.
    #[error("table size update to {0}, over the allowed {1}")]
    TableTooLarge(usize, usize),
    /// A table size update after a field.
    #[error("table size update after a header field")]
    LateTableSizeUpdate,
    /// The decoded list reached the limit given to [`Decoder::decode`].
    #[error("header list of at least {0} bytes reaches the {1}-byte limit")]
    ListTooLarge(usize, usize),
}

/// A decoded header list: every name and value in one buffer, except
/// Huffman-coded values that are not needed yet.
#[derive(Debug, Default)]
pub struct HeaderList {
    bytes: Vec<u8>,
    fields: Vec<(Range<usize>, Value)>,
    /// Size of what is decoded, as the server counts it against its limit:
    /// names, values and 32 bytes per field.
    size: usize,
    /// The most that the values still Huffman-coded can add to `size`.
    pending: usize,
}

/// Where a field's value is.
#[derive(Debug)]
enum Value {
    /// In the list's buffer.
    Decoded(Range<usize>),
    /// Still Huffman-coded, at this range of the block.
    Huffman(Range<usize>),
}

impl HeaderList {
    /// Each field's name and value, in order, with the pending values
    /// decoded from `block`, the block the list was decoded from.
    pub fn fields(
        &mut self,
        block: &[u8],
    ) -> Result<impl Iterator<Item = (&[u8], &[u8])>, DecodeError> {
        self.decode_pending(block)?;
        Ok(self.fields.iter().filter_map(|(name, value)| match value {
            Value::Decoded(value) => Some((&self.bytes[name.clone()], &self.bytes[value.clone()])),
            Value::Huffman(_) => None,
        }))
    }

    /// The values of the `:authority` fields, which are always decoded.
    pub fn authorities(&self) -> impl Iterator<Item = &[u8]> {
        self.fields.iter().filter_map(|(name, value)| match value {
            Value::Decoded(value) if self.bytes[name.clone()] == *b":authority" => {
                Some(&self.bytes[value.clone()])
            }
            _ => None,
        })
    }

    /// The list's size (names, values and 32 bytes per field), or more while
    /// values are pending.
    pub fn size_bound(&self) -> usize {
        self.size + self.pending
    }

    /// Decodes the values left Huffman-coded in `block`, the block the list
    /// was decoded from.
    pub fn decode_pending(&mut self, block: &[u8]) -> Result<(), DecodeError> {
        for (_, value) in &mut self.fields {
            if let Value::Huffman(coded) = value {
                let decoded = huffman(&block[coded.clone()], &mut self.bytes)?;
                self.size += decoded.len();
                *value = Value::Decoded(decoded);
            }
        }
        self.pending = 0;
        Ok(())
    }

    /// Empties the list, keeping its buffers unless they grew large.
    fn clear(&mut self) {
        const KEPT_BYTES: usize = 1024;
        if self.bytes.capacity() > KEPT_BYTES {
            *self = Self::default();
        }
        self.bytes.clear();
        self.fields.clear();
        self.size = 0;
        self.pending = 0;
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// Decodes a string literal (§5.2) from `src` into the buffer.
    fn push_string(&mut self, src: &mut &[u8]) -> Result<Range<usize>, DecodeError> {
        match string(src)? {
            (true, coded) => huffman(coded, &mut self.bytes),
            (false, raw) => Ok(self.push_bytes(raw)),
        }
    }

    fn push(
        &mut self,
        name: Range<usize>,
        value: Value,
        max_size: usize,
    ) -> Result<(), DecodeError> {
        self.size += name.len() + ENTRY_OVERHEAD;
        match &value {
            Value::Decoded(value) => self.size += value.len(),
            // The shortest Huffman code has 5 bits.
            Value::Huffman(coded) => self.pending += coded.len() * 8 / 5,
        }
        if self.size >= max_size {
            return Err(DecodeError::ListTooLarge(self.size, max_size));
        }
        self.fields.push((name, value));
        Ok(())
    }
}

/// One connection's HPACK decoding state.
pub struct Decoder {
    table: Table,
    /// The largest table size the client may ask for (the server's
    /// SETTINGS_HEADER_TABLE_SIZE).
    max_allowed: usize,
}

impl Decoder {
    /// A decoder whose client may use up to `max_table_size` bytes of table.
    pub fn new(max_table_size: usize) -> Self {
        Self {
            table: Table::new(max_table_size),
            max_allowed: max_table_size,
        }
    }

    /// Decodes one complete header block into `list` (emptied first),
    /// keeping the dynamic table in step; stops with an error once the size
    /// of what it decoded reaches `max_list_size`. Huffman-coded values that
    /// enter no table and belong to no `:authority` are left pending (see
    /// [`HeaderList::decode_pending`]): most requests need none of them.
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
        list: &mut HeaderList,
    ) -> Result<(), DecodeError> {
        list.clear();
        let mut src = block;
        let mut fields_seen = false;
        while let Some(&first) = src.first() {
            let (name, value) = match first {
                // Indexed field (§6.1).
                0x80.. => {
                    let index = integer(&mut src, 7)?;
                    let (name, value) = self.table.get(index)?;
                    (
                        list.push_bytes(name),
                        Value::Decoded(list.push_bytes(value)),
                    )
                }
                // Literal with incremental indexing (§6.2.1).
                0x40.. => {
                    let name = self.literal_name(&mut src, 6, list)?;
                    let value = list.push_string(&mut src)?;
                    self.table
                        .insert(&list.bytes[name.clone()], &list.bytes[value.clone()]);
                    (name, Value::Decoded(value))
                }
                // Dynamic table size update (§6.3).
                0x20.. => {
                    if fields_seen {
                        return Err(DecodeError::LateTableSizeUpdate);
                    }
                    let size = integer(&mut src, 5)?;
                    if size > self.max_allowed {
                        return Err(DecodeError::TableTooLarge(size, self.max_allowed));
                    }
                    self.table.set_max_size(size);
                    continue;
                }
                // Literal never indexed (§6.2.3) or without indexing (§6.2.2).
                _ => {
                    let name = self.literal_name(&mut src, 4, list)?;
                    let value = match string(&mut src)? {
                        (true, coded) if list.bytes[name.clone()] != *b":authority" => {
                            let end = block.len() - src.len();
                            Value::Huffman(end - coded.len()..end)
                        }
                        (true, coded) => Value::Decoded(huffman(coded, &mut list.bytes)?),
                        (false, raw) => Value::Decoded(list.push_bytes(raw)),
                    };
                    (name, value)
                }
            };
            fields_seen = true;
            list.push(name, value, max_list_size)?;
        }
        Ok(())
    }

    /// The name of a literal field: indexed (`prefix` bits) or literal,
    /// appended to `list`'s buffer.
    fn literal_name(
        &self,
        src: &mut &[u8],
        prefix: u8,
        list: &mut HeaderList,
    ) -> Result<Range<usize>, DecodeError> {
        match integer(src, prefix)? {
            0 => list.push_string(src),
            index => Ok(list.push_bytes(self.table.get(index)?.0)),
        }
    }
}

/// Reads a string literal (§5.2): whether it is Huffman-coded, and its bytes.
fn string<'a>(src: &mut &'a [u8]) -> Result<(bool, &'a [u8]), DecodeError> {
    let huffman_coded = src.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(src, 7)?;
    if src.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (string, rest) = src.split_at(len);
    *src = rest;
    Ok((huffman_coded, string))
}

/// Appends the Huffman decoding (Appendix B) of `coded` to `out`, and
/// returns where it stands there.
fn huffman(coded: &[u8], out: &mut Vec<u8>) -> Result<Range<usize>, DecodeError> {
    let start = out.len();
    httlib_huffman::decode(coded, out, DecoderSpeed::FiveBits).map_err(|_| DecodeError::Huffman)?;
    Ok(start..out.len())
}

/// Decodes an integer with an `n`-bit prefix (§5.1).
fn integer(src: &mut &[u8], n: u8) -> Result<usize, DecodeError> {
    let mask = (1usize << n) - 1;
    let (&first, mut rest) = src.split_first().ok_or(DecodeError::Truncated)?;
    let mut value = usize::from(first) & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, after) = rest.split_first().ok_or(DecodeError::Truncated)?;
            rest = after;
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
            if shift >= 7 * (MAX_INTEGER_BYTES - 1) {
                return Err(DecodeError::IntegerTooLong);
            }
        }
    }
    *src = rest;
    Ok(value)
}

/// Appends `bytes` as a string literal without Huffman coding (§5.2).
pub fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    encode_integer(bytes.len(), 7, out);
    out.extend_from_slice(bytes);
}

/// Appends an integer with an `n`-bit prefix, the bits above it zero (§5.1).
fn encode_integer(value: usize, n: u8, out: &mut Vec<u8>) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(value as u8);
        return;
    }
    out.push(mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The static table (Appendix A) and the dynamic table (§2.3.2, §4), which
/// index from 1 as one address space.
struct Table {
    /// Newest first; each entry's name and value in one allocation.
    entries: VecDeque<(Box<[u8]>, usize)>,
    size: usize,
    max_size: usize,
}

impl Table {
    fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        if let Some(&(name, value)) = index.checked_sub(1).and_then(|i| STATIC_TABLE.get(i)) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        let (bytes, name_len) = index
            .checked_sub(STATIC_TABLE.len() + 1)
            .and_then(|i| self.entries.get(i))
            .ok_or(DecodeError::NoSuchEntry(index))?;
        Ok(bytes.split_at(*name_len))
    }

    /// Adds an entry, evicting the oldest ones to make room; an entry larger
    /// than the table empties it (§4.4).
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.entries
            .push_front(([name, value].concat().into(), name.len()));
        self.size += size;
    }

    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let (bytes, _) = self
                .entries
                .pop_back()
                .expect("a table with a size has entries");
            self.size -= bytes.len() + ENTRY_OVERHEAD;
        }
    }
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 Appendix C.4: three requests with Huffman coding, which
    /// fill and then reuse the dynamic table.
    #[test]
    fn decodes_the_rfc_examples() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let strings = |list: &mut HeaderList| -> Vec<(String, String)> {
            list.fields(&[])
                .unwrap()
                .map(|(n, v)| {
                    (
                        String::from_utf8(n.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let mut decoder = Decoder::new(4096);
        let decode = |decoder: &mut Decoder, block: &str| {
            let mut list = HeaderList::default();
            decoder.decode(&hex(block), 16384, &mut list).unwrap();
            list
        };
        let mut first = decode(&mut decoder, "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            strings(&mut first),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert_eq!(first.size_bound(), 4 * 32 + 7 + 3 + 7 + 4 + 5 + 1 + 10 + 15);
        let mut second = decode(&mut decoder, "8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            strings(&mut second)[3],
            (":authority".into(), "www.example.com".into())
        );
        assert_eq!(
            strings(&mut second)[4],
            ("cache-control".into(), "no-cache".into())
        );
        let mut third = decode(
            &mut decoder,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        );
        assert_eq!(
            strings(&mut third)[2],
            (":path".into(), "/index.html".into())
        );
        assert_eq!(
            strings(&mut third)[3],
            (":authority".into(), "www.example.com".into())
        );
        assert_eq!(
            strings(&mut third)[4],
            ("custom-key".into(), "custom-value".into())
        );
        assert_eq!(decoder.table.size, 164);
    }

    #[test]
    fn integers_round_trip_and_are_bounded() {
        for (value, n) in [
            (10, 5),
            (1337, 5),
            (42, 8),
            (0, 7),
            (127, 7),
            (268_435_582, 7),
        ] {
            let mut out = Vec::new();
            encode_integer(value, n, &mut out);
            let mut src = &out[..];
            assert_eq!(integer(&mut src, n), Ok(value));
            assert!(src.is_empty());
        }
        let mut src = &[0x7f, 0xff, 0xff, 0xff, 0xff, 0x01][..];
        assert_eq!(integer(&mut src, 7), Err(DecodeError::IntegerTooLong));
        let mut src = &[0x7f, 0xff][..];
        assert_eq!(integer(&mut src, 7), Err(DecodeError::Truncated));
    }

    #[test]
    fn what_the_server_would_refuse_is_an_error() {
        let decode =
            |block: &[u8]| Decoder::new(4096).decode(block, 16384, &mut HeaderList::default());
        assert_eq!(decode(&[0x80]), Err(DecodeError::NoSuchEntry(0)));
        assert_eq!(decode(&[0xbe]), Err(DecodeError::NoSuchEntry(62)));
        assert_eq!(
            decode(&[0x3f, 0xe2, 0x1f]),
            Err(DecodeError::TableTooLarge(4097, 4096))
        );
        assert_eq!(decode(&[0x82, 0x20]), Err(DecodeError::LateTableSizeUpdate));
        assert_eq!(decode(&[0x00, 0x85, 0xff]), Err(DecodeError::Truncated));
        // A Huffman string holding EOS (30 one bits).
        assert_eq!(
            decode(&[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x00]),
            Err(DecodeError::Huffman)
        );
        // A 4,000-byte entry named seven times: 28 KB from 4 KB.
        let mut bomb = vec![0x40, 0x01, b'x'];
        encode_string(&[b'v'; 4000], &mut bomb);
        bomb.extend([0xbe; 7]);
        assert!(matches!(
            decode(&bomb),
            Err(DecodeError::ListTooLarge(_, 16384))
        ));
    }

    #[test]
    fn the_table_evicts_oldest_first_and_empties_for_a_huge_entry() {
        let mut table = Table::new(100);
        table.insert(b"a", &[b'1'; 20]); // 53 bytes
        table.insert(b"b", &[b'2'; 20]); // 53 more: "a" goes
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.get(62).unwrap().0, b"b");
        table.insert(b"c", &[b'3'; 80]); // larger than the table
        assert_eq!(table.entries.len(), 0);
        assert_eq!(table.size, 0);
        table.insert(b"d", b"");
        table.set_max_size(0);
        assert_eq!(table.get(62), Err(DecodeError::NoSuchEntry(62)));
    }
}
