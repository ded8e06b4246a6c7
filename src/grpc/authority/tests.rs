//! The rewriter against HPACK implementations that are not ours: what a
//! client encodes with httlib-hpack, h2 must decode (here with loona-hpack,
//! whose Huffman code is independent of ours), with only a refused
//! authority replaced.

use httlib_hpack::Encoder;
use proptest::prelude::*;

use super::frames::{PREFACE, Refusal, Rewriter};
use super::header_block::h2_accepts_authority;
use super::{MAX_FRAME_SIZE, REPLACEMENT_AUTHORITY};

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// How a client lays one header block out in frames.
#[derive(Clone, Debug, Default)]
struct Shape {
    /// A dynamic table size update at the start of the block.
    table_size: Option<u32>,
    /// httlib-hpack's flags for each field (Huffman, indexing).
    flags: Vec<u8>,
    padding: Option<u8>,
    priority: Option<[u8; 5]>,
    end_stream: bool,
    /// Where the fragment is cut into CONTINUATION frames (fractions).
    cuts: Vec<f64>,
}

/// What the server side sees, in order.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Headers {
        stream: u32,
        end_stream: bool,
        priority: Option<[u8; 5]>,
        fields: Fields,
    },
    /// Any other frame, byte for byte.
    Frame(Vec<u8>),
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A client writing frames with httlib-hpack's encoder.
struct Client {
    encoder: Encoder<'static>,
    bytes: Vec<u8>,
}

impl Client {
    fn new() -> Self {
        Self {
            encoder: Encoder::with_dynamic_size(4096),
            bytes: PREFACE.to_vec(),
        }
    }

    fn headers(&mut self, stream: u32, fields: &Fields, shape: &Shape) {
        let mut fragment = Vec::new();
        if let Some(size) = shape.table_size {
            self.encoder
                .update_max_dynamic_size(size, &mut fragment)
                .unwrap();
        }
        for (i, (name, value)) in fields.iter().enumerate() {
            let flags = shape.flags.get(i).copied().unwrap_or(0);
            self.encoder
                .encode((name.clone(), value.clone(), flags), &mut fragment)
                .unwrap();
        }
        let mut cuts: Vec<usize> = shape
            .cuts
            .iter()
            .map(|f| (f * fragment.len() as f64) as usize)
            .collect();
        cuts.sort();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([fragment.len()]) {
            if cut > start || pieces.is_empty() && cut == fragment.len() {
                pieces.push(&fragment[start..cut]);
                start = cut;
            }
        }
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let mut flags = if last { END_HEADERS } else { 0 };
            let mut payload = Vec::new();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            if i == 0 {
                if shape.end_stream {
                    flags |= END_STREAM;
                }
                if let Some(pad) = shape.padding {
                    flags |= PADDED;
                    payload.push(pad);
                }
                if let Some(priority) = shape.priority {
                    flags |= PRIORITY;
                    payload.extend(priority);
                }
            }
            payload.extend_from_slice(piece);
            if i == 0 {
                payload.extend(std::iter::repeat_n(0, shape.padding.unwrap_or(0).into()));
            }
            self.bytes.extend(frame(kind, flags, stream, &payload));
        }
    }

    fn other(&mut self, raw: &[u8]) {
        self.bytes.extend_from_slice(raw);
    }
}

/// Feeds `input` to a rewriter in chunks cut at `cuts`, as the connection
/// wrapper does, and returns what h2 would read.
fn rewrite(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Refusal>, bool) {
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    let mut refused = None;
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort();
    for end in cuts.into_iter().chain([input.len()]) {
        if end <= start {
            continue;
        }
        let chunk = &input[start..end];
        start = end;
        if rewriter.is_closed() {
            break;
        }
        let (passed, refusal) = rewriter.accept(chunk);
        out.extend_from_slice(&chunk[..passed]);
        let ready = rewriter.ready().to_vec();
        rewriter.advance_ready(ready.len());
        out.extend(ready);
        refused = refused.or(refusal);
    }
    (out, refused, rewriter.reencoding())
}

/// Parses what h2 reads, decoding header blocks with httlib-hpack.
fn server_view(bytes: &[u8]) -> Vec<Event> {
    assert!(bytes.starts_with(PREFACE), "the preface passes first");
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(4096);
    let mut events = Vec::new();
    let mut at = PREFACE.len();
    // The block being received: its HEADERS event and fragment so far.
    let mut open: Option<(Event, Vec<u8>)> = None;
    while at < bytes.len() {
        let head = &bytes[at..at + 9];
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap());
        assert!(len <= MAX_FRAME_SIZE, "frames fit the server's limit");
        let payload = &bytes[at + 9..at + 9 + len];
        let raw = &bytes[at..at + 9 + len];
        at += 9 + len;
        let fragment = match kind {
            HEADERS => {
                assert!(open.is_none());
                let mut rest = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    pad = usize::from(rest[0]);
                    rest = &rest[1..];
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    priority = Some(rest[..5].try_into().unwrap());
                    rest = &rest[5..];
                }
                let event = Event::Headers {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fields: Vec::new(),
                };
                open = Some((event, Vec::new()));
                &rest[..rest.len() - pad]
            }
            CONTINUATION => {
                let Some((Event::Headers { stream: opened, .. }, _)) = &open else {
                    panic!("CONTINUATION without HEADERS");
                };
                assert_eq!(*opened, stream);
                payload
            }
            _ => {
                assert!(open.is_none(), "nothing interrupts a header block");
                events.push(Event::Frame(raw.to_vec()));
                continue;
            }
        };
        open.as_mut().unwrap().1.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            let (mut event, block) = open.take().unwrap();
            if let Event::Headers { fields, .. } = &mut event {
                *fields = decoder.decode(&block).unwrap();
            }
            events.push(event);
        }
    }
    assert!(open.is_none(), "no header block is left open");
    events
}

/// What h2 should see of a block: refused authorities replaced.
fn expected_fields(fields: &Fields) -> Fields {
    fields
        .iter()
        .map(|(name, value)| {
            if name == b":authority" && !h2_accepts_authority(value) {
                (name.clone(), REPLACEMENT_AUTHORITY.as_bytes().to_vec())
            } else {
                (name.clone(), value.clone())
            }
        })
        .collect()
}

fn request(authority: &[u8]) -> Fields {
    [
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/tokenbroker.v1.TokenBroker/GetIdToken"),
        (b":authority", authority),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ]
    .iter()
    .map(|(n, v)| (n.to_vec(), v.to_vec()))
    .collect()
}

const HUFFMAN: u8 = Encoder::HUFFMAN_NAME | Encoder::HUFFMAN_VALUE;
const INDEXED: u8 = Encoder::WITH_INDEXING | Encoder::BEST_FORMAT | HUFFMAN;

#[test]
fn valid_authorities_pass_byte_for_byte() {
    let mut client = Client::new();
    let shape = Shape {
        flags: vec![INDEXED; 6],
        ..Shape::default()
    };
    for stream in [1, 3, 5] {
        client.headers(stream, &request(b"localhost"), &shape);
        client.other(&frame(0x0, END_STREAM, stream, b"\0\0\0\0\x02hi"));
    }
    for cuts in [vec![], vec![1, 30, 31, 40, 100, 101], (0..400).collect()] {
        let (out, refused, reencoding) = rewrite(&client.bytes, &cuts);
        assert_eq!(refused, None);
        assert!(!reencoding);
        assert_eq!(out, client.bytes);
    }
}

#[test]
fn a_socket_path_becomes_localhost_for_the_rest_of_the_connection() {
    let mut client = Client::new();
    let shape = Shape {
        flags: vec![INDEXED; 6],
        ..Shape::default()
    };
    client.headers(1, &request(b"localhost"), &shape);
    client.headers(3, &request(b"%2Frun%2Ftokenbroker.sock"), &shape);
    // Now mostly references to the client's dynamic table.
    client.headers(5, &request(b"%2Frun%2Ftokenbroker.sock"), &shape);
    client.headers(7, &request(b"localhost"), &shape);
    let (out, refused, reencoding) = rewrite(&client.bytes, &[]);
    assert_eq!(refused, None);
    assert!(reencoding);
    let authorities: Vec<_> = server_view(&out)
        .into_iter()
        .map(|event| match event {
            Event::Headers { fields, .. } => fields[3].1.clone(),
            Event::Frame(_) => panic!("only header blocks were sent"),
        })
        .collect();
    assert_eq!(authorities, [&b"localhost"[..]; 4]);
}

#[test]
fn what_h2_would_refuse_closes_the_connection() {
    let headers = |payload: &[u8], flags| frame(HEADERS, flags, 1, payload);
    let valid = {
        let mut client = Client::new();
        client.headers(1, &request(b"localhost"), &Shape::default());
        client.bytes[PREFACE.len()..].to_vec()
    };
    let cases: Vec<(Vec<u8>, Refusal)> = vec![
        (
            frame(CONTINUATION, END_HEADERS, 1, b""),
            Refusal::StrayContinuation,
        ),
        (
            frame(0x5, END_HEADERS, 1, b"\0\0\0\x02"),
            Refusal::PushPromise,
        ),
        (
            [headers(b"\x82", 0), frame(0x0, 0, 1, b"")].concat(),
            Refusal::Interrupted(1),
        ),
        (
            [
                headers(b"\x82", 0),
                frame(CONTINUATION, END_HEADERS, 3, b""),
            ]
            .concat(),
            Refusal::Interrupted(1),
        ),
        (
            headers(&vec![0; MAX_FRAME_SIZE + 1], END_HEADERS),
            Refusal::FrameTooLarge(MAX_FRAME_SIZE + 1),
        ),
        (
            [
                headers(b"\x82", 0),
                frame(CONTINUATION, 0, 1, b"").repeat(6),
            ]
            .concat(),
            Refusal::TooManyContinuations,
        ),
        (headers(b"\x05", END_HEADERS | PADDED), Refusal::BadPadding),
        (
            headers(b"\0\0\0", END_HEADERS | PRIORITY),
            Refusal::BadPadding,
        ),
    ];
    for (bad, reason) in cases {
        // A valid request first, which h2 still gets.
        let input = [PREFACE, &valid, &bad, &valid].concat();
        let (out, refused, _) = rewrite(&input, &[]);
        assert_eq!(refused, Some(reason));
        let poison = frame(HEADERS, END_HEADERS | END_STREAM, 0, b"");
        assert_eq!(out, [PREFACE, &valid, &poison].concat());
    }
    // Bad HPACK: an index that does not exist.
    let (out, refused, _) = rewrite(&[PREFACE, &headers(b"\xff\x7f", END_HEADERS)].concat(), &[]);
    assert!(matches!(refused, Some(Refusal::Block(_))));
    assert!(out.ends_with(&frame(HEADERS, END_HEADERS | END_STREAM, 0, b"")));
}

#[test]
fn not_http2_passes_as_it_is() {
    let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let (out, refused, _) = rewrite(input, &[3, 20]);
    assert_eq!(refused, None);
    assert_eq!(out, input);
}

fn authority() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"localhost".to_vec()),
        Just(b"localhost:50051".to_vec()),
        Just(b"/run/tokenbroker/tokenbroker.sock".to_vec()),
        Just(b"%2Frun%2Ftokenbroker%2Ftokenbroker.sock".to_vec()),
        Just(b"unix:/run/tokenbroker.sock".to_vec()),
        Just(Vec::new()),
        Just(b"caf\xc3\x28".to_vec()),
        Just(vec![b'a'; 4096]),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    let name = prop_oneof![
        Just(b"content-type".to_vec()),
        Just(b"user-agent".to_vec()),
        Just(b"grpc-timeout".to_vec()),
        "[a-z][a-z0-9-]{0,20}".prop_map(String::into_bytes),
    ];
    let value = proptest::collection::vec(any::<u8>(), 0..60);
    (
        proptest::option::of(authority()),
        proptest::collection::vec((name, value), 0..8),
    )
        .prop_map(|(authority, rest)| {
            let mut fields = vec![(b":method".to_vec(), b"POST".to_vec())];
            if let Some(authority) = authority {
                fields.push((b":authority".to_vec(), authority));
            }
            fields.extend(rest);
            fields
        })
}

fn shape() -> impl Strategy<Value = Shape> {
    let flag = prop_oneof![
        Just(0),
        Just(HUFFMAN),
        Just(Encoder::WITH_INDEXING),
        Just(INDEXED),
        Just(Encoder::NEVER_INDEXED | Encoder::HUFFMAN_VALUE),
        Just(Encoder::BEST_FORMAT),
    ];
    (
        proptest::option::of(0u32..=4096),
        proptest::collection::vec(flag, 10),
        proptest::option::of(any::<u8>()),
        proptest::option::of(any::<[u8; 5]>()),
        any::<bool>(),
        proptest::collection::vec(0.0..1.0f64, 0..5),
    )
        .prop_map(
            |(table_size, flags, padding, priority, end_stream, cuts)| Shape {
                table_size,
                flags,
                padding,
                priority,
                end_stream,
                cuts,
            },
        )
}

fn other_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..100).prop_map(|data| frame(0x0, 0, 1, &data)),
        any::<[u8; 8]>().prop_map(|data| frame(0x6, 0, 0, &data)),
        Just(frame(0x8, 0, 0, &[0, 0, 1, 0])),
        Just(frame(0x4, 0, 0, &[])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random header lists, encoded by httlib-hpack with dynamic-table
    /// indexing, Huffman strings, table size updates, CONTINUATION splits,
    /// padding and priority, between other frames and cut into random reads:
    /// h2 decodes the originals, with only refused authorities replaced.
    #[test]
    fn h2_decodes_what_the_client_encoded(
        blocks in proptest::collection::vec((fields(), shape(), proptest::option::of(other_frame())), 1..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut client = Client::new();
        let mut expected = Vec::new();
        for (i, (fields, shape, other)) in blocks.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            client.headers(stream, fields, shape);
            expected.push(Event::Headers {
                stream,
                end_stream: shape.end_stream,
                priority: shape.priority,
                fields: expected_fields(fields),
            });
            if let Some(other) = other {
                client.other(other);
                expected.push(Event::Frame(other.clone()));
            }
        }
        let (out, refused, reencoding) = rewrite(&client.bytes, &cuts);
        prop_assert_eq!(refused, None);
        prop_assert_eq!(server_view(&out), expected);
        let any_refused = blocks.iter().any(|(fields, _, _)| expected_fields(fields) != *fields);
        prop_assert_eq!(reencoding, any_refused);
        if !any_refused {
            prop_assert_eq!(out, client.bytes);
        }
    }

    /// Random bytes after a valid preface never panic, and whatever the
    /// rewriter passes on is a prefix of them or ends in a refusal.
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..4000),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let input = [PREFACE, &bytes].concat();
        let (out, refused, _) = rewrite(&input, &cuts);
        prop_assert!(out.starts_with(PREFACE));
        if refused.is_some() {
            prop_assert!(out.ends_with(&frame(HEADERS, END_HEADERS | END_STREAM, 0, b"")));
        }
    }
}
