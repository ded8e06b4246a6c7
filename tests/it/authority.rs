//! Any `:authority` works on the broker's socket: what gRPC C-core, grpc-java
//! and grpcurl send (the socket path, raw or percent-encoded), and anything
//! else h2 would refuse. A malformed HTTP/2 stream closes its own connection
//! with a connection error and touches no other.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokenbroker::proto::v1::IdToken;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::common::authority_shim::{Authority, AuthorityShim};
use crate::common::h2::{
    CONTINUATION, GOAWAY, HEADERS, PREFACE, SETTINGS, frame, frames_until_closed,
};
use crate::common::{Broker, claims, id_request, poll_until};

const AUDIENCE: &str = "https://hello-abc123-uc.a.run.app";

/// An h2 client connection to the broker whose requests carry `authority`.
async fn h2_client(broker: &Broker, authority: Authority) -> h2::client::SendRequest<Bytes> {
    let stream = UnixStream::connect(&broker.socket).await.unwrap();
    let (client, connection) = h2::client::handshake(AuthorityShim::new(stream, authority))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `GetIdToken` over raw HTTP/2: the `grpc-status` and the token.
async fn get_id_token(client: &h2::client::SendRequest<Bytes>, audience: &str) -> (String, String) {
    let request = http::Request::post("http://placeholder/tokenbroker.v1.TokenBroker/GetIdToken")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut client = client.clone().ready().await.unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let message = id_request(audience).encode_to_vec();
    let mut frame = vec![0];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    body.send_data(frame.into(), true).unwrap();
    let mut response = response.await.unwrap().into_body();
    let mut data = BytesMut::new();
    while let Some(chunk) = response.data().await {
        let chunk = chunk.unwrap();
        response
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = response.trailers().await.unwrap().unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .map_or("none".into(), |s| s.to_str().unwrap().to_string());
    let token = if data.len() > 5 {
        data.advance(5);
        IdToken::decode(data).unwrap().token
    } else {
        String::new()
    };
    (status, token)
}

#[tokio::test]
async fn every_authority_gets_tokens_on_one_connection_and_in_parallel() {
    let broker = Broker::emulated(&[]).await;
    let path = broker.socket.to_str().unwrap().to_string();
    let encoded = path.replace('/', "%2F");
    let long = format!("/{}", "long/".repeat(1000)).into_bytes()[..4096].to_vec();
    let cases: Vec<(&str, Authority)> = vec![
        ("raw path", Authority::Bytes(path.clone().into_bytes())),
        (
            "percent-encoded path",
            Authority::Bytes(encoded.into_bytes()),
        ),
        (
            "unix: form",
            Authority::Bytes(format!("unix:{path}").into_bytes()),
        ),
        ("empty", Authority::Bytes(Vec::new())),
        ("absent", Authority::Absent),
        ("4 KiB", Authority::Bytes(long)),
        (
            "non-UTF-8",
            Authority::Bytes(b"\xff\xfe/run/\xc3(.sock".to_vec()),
        ),
        ("localhost", Authority::Bytes(b"localhost".to_vec())),
    ];
    for (name, authority) in cases {
        let client = h2_client(&broker, authority).await;
        for _ in 0..3 {
            let (status, token) = get_id_token(&client, AUDIENCE).await;
            assert_eq!(status, "0", "{name}: one request after another");
            assert_eq!(claims(&token)["aud"], AUDIENCE, "{name}");
        }
        let parallel = (0..8).map(|i| {
            let client = client.clone();
            async move { get_id_token(&client, &format!("{AUDIENCE}/{i}")).await }
        });
        for (i, (status, token)) in futures_util::future::join_all(parallel)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(status, "0", "{name}: concurrent streams");
            assert_eq!(claims(&token)["aud"], format!("{AUDIENCE}/{i}"), "{name}");
        }
    }
}

/// Number of file descriptors the broker holds.
fn open_fds(broker: &Broker) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", broker.pid()))
        .unwrap()
        .count()
}

/// Waits until the broker holds at most `count` descriptors.
async fn wait_for_fds(broker: &Broker, count: usize) {
    poll_until(
        "the broker closing the connections' descriptors",
        || open_fds(broker) <= count,
        || format!("it holds {}, {count} before", open_fds(broker)),
    )
    .await;
}

#[tokio::test]
async fn a_malformed_stream_closes_its_connection_with_a_connection_error() {
    let broker = Broker::spawn(
        vec!["--emulator".into()],
        &[("RUST_LOG", "info,tokenbroker=debug")],
    )
    .await;
    let mut healthy = broker.typed_client().await;
    healthy.id_token(id_request(AUDIENCE)).await.unwrap();
    let fds = open_fds(&broker);

    const PROTOCOL_ERROR: u32 = 1;
    let settings = frame(SETTINGS, 0, 0, b"");
    // A 3,000-byte value entered in the dynamic table, then named five
    // times more by one-byte references: 18 KiB decoded from 3 KiB.
    let oversized = {
        let mut block = vec![0x83, 0x86, 0x84, 0x40, 1, b'x', 0x7f, 0xb9, 0x16];
        block.extend([b'v'; 3000]);
        block.extend([0xbe; 5]);
        frame(HEADERS, 0x5, 1, &block)
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad HPACK",
            frame(HEADERS, 0x5, 1, b"\xff\x7f"),
            "no table entry",
        ),
        (
            "a block split wrongly",
            [
                frame(HEADERS, 0x0, 1, b"\x82"),
                frame(CONTINUATION, 0x4, 3, b"\x86"),
            ]
            .concat(),
            "interrupted",
        ),
        (
            "an oversized header list",
            oversized,
            "reaches the 16384-byte limit",
        ),
    ];
    for (name, bad, logged) in cases {
        let mut stream = UnixStream::connect(&broker.socket).await.unwrap();
        stream
            .write_all(&[PREFACE, &settings, &bad].concat())
            .await
            .unwrap();
        let frames = frames_until_closed(stream).await;
        let goaway = frames
            .iter()
            .find(|(kind, _)| *kind == GOAWAY)
            .unwrap_or_else(|| panic!("{name}: no GOAWAY in {frames:?}"));
        let code = u32::from_be_bytes(goaway.1[4..8].try_into().unwrap());
        assert_eq!(code, PROTOCOL_ERROR, "{name}");
        broker
            .wait_for_log_lines(&["closing an HTTP/2 connection", logged], 1)
            .await;
        healthy.id_token(id_request(AUDIENCE)).await.unwrap();
    }

    // Garbage before the preface: h2 refuses it, the log says why.
    let mut stream = UnixStream::connect(&broker.socket).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    frames_until_closed(stream).await;
    broker.wait_for_log("not an HTTP/2 client preface").await;

    healthy.id_token(id_request(AUDIENCE)).await.unwrap();
    wait_for_fds(&broker, fds).await;
    assert!(!broker.logs().contains("panic"), "{}", broker.logs());
}

#[tokio::test]
async fn random_bytes_after_the_preface_never_disturb_a_healthy_connection() {
    let broker = Broker::emulated(&[]).await;
    let mut healthy = broker.typed_client().await;
    healthy.id_token(id_request(AUDIENCE)).await.unwrap();
    let fds = open_fds(&broker);

    let mut rng = fastrand::Rng::with_seed(0x70b2_0e4b);
    let fuzzers = (0..64).map(|_| {
        let len = rng.usize(0..4096);
        let mut bytes: Vec<u8> = PREFACE.to_vec();
        bytes.extend((0..len).map(|_| rng.u8(..)));
        let socket = broker.socket.clone();
        async move {
            let mut stream = UnixStream::connect(socket).await.unwrap();
            // The broker may close first; either way it must close.
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            frames_until_closed(stream).await;
        }
    });
    let calls = async {
        for _ in 0..64 {
            let token = healthy
                .id_token(id_request(AUDIENCE))
                .await
                .expect("the healthy connection keeps working");
            assert_eq!(claims(&token.token)["aud"], AUDIENCE);
        }
    };
    tokio::join!(futures_util::future::join_all(fuzzers), calls);

    wait_for_fds(&broker, fds).await;
    assert!(!broker.logs().contains("panic"), "{}", broker.logs());
}
