//! Hostile peers: each attack on loopback, bounded in count and time, and after each the server is
//! healthy and still answers another client.

use std::time::Duration;

use tonic::Code;

use crate::support::{h2raw::*, *};

/// After an attack: a well-behaved client on a new connection is still answered.
async fn still_serves(server: &TestServer) {
    let mut client = server.client().await;
    let ack = tokio::time::timeout(
        PATIENCE,
        authorize_as(&mut client, STATION_A, TOKEN_GRANTED, ""),
    )
    .await
    .expect("answered within patience")
    .expect("an acknowledgement");
    assert!(!ack.request_id.is_empty());
}

/// What the server sent on a connection until it closed it, went quiet for `quiet`, or sent
/// `enough` frames.
async fn drain(conn: &mut RawConnection, quiet: Duration, enough: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    while frames.len() < enough {
        match conn.next(quiet).await {
            Some(f) => frames.push(f),
            None => break,
        }
    }
    frames
}

/// RUSTSEC-2024-0003: every malformed request makes the server reset a stream (HTTP/2 stream
/// error PROTOCOL_ERROR). Unbounded, a peer keeps the server resetting streams forever on one
/// connection; bounded, the connection ends with GOAWAY ENHANCE_YOUR_CALM after 1,024.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_requests_ends_the_connection_not_the_server() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut conn = RawConnection::open(server.addr).await;
    const FLOOD: u32 = 5_000;
    // HEADERS with no pseudo-headers at all: a malformed request, reset by the library.
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &[]));
    }
    // The server may close the connection while the flood is still being written.
    let _ = conn.send(&flood).await;
    let frames = drain(&mut conn, Duration::from_secs(3), FLOOD as usize + 10).await;
    let resets = frames.iter().filter(|f| f.kind == RST_STREAM).count();
    let goaway = frames.iter().find_map(Frame::goaway_code);
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "the connection ends with GOAWAY ENHANCE_YOUR_CALM ({resets} streams reset)"
    );
    assert!(resets <= 1_024, "{resets} streams reset before the GOAWAY");
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// `max_message_bytes` (64 KiB by default): a larger request is `RESOURCE_EXHAUSTED` (tonic
/// alone answers `OUT_OF_RANGE` past its 4 MiB), and the next call goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_resource_exhausted_and_the_next_call_passes() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    for size in [70 * 1024, 2 * 1024 * 1024, 5 * 1024 * 1024] {
        let status = authorize_as(&mut client, STATION_A, &"T".repeat(size), "")
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{size} bytes: {status:?}"
        );
        assert!(status.message().contains("max_message_bytes"), "{status:?}");
    }
    let ack = authorize_as(&mut client, STATION_A, TOKEN_GRANTED, "after-the-big-ones")
        .await
        .expect("a call of ordinary size passes");
    assert!(!ack.duplicate);
    server.stop().await.expect("clean stop");
}

/// Length prefixes of 2 MiB and 4 GiB with no message behind them: refused from the prefix, no
/// buffer reserved, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_prefix_is_refused_and_the_connection_goes_on() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut conn = RawConnection::open(server.addr).await;
    for (stream, len) in [(1u32, 2u32 * 1024 * 1024), (3, u32::MAX)] {
        let mut bytes = frame(
            HEADERS,
            END_HEADERS,
            stream,
            &grpc_call("/chargegate.v1.ChargingAuthorization/Authorize"),
        );
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&len.to_be_bytes());
        bytes.extend(frame(DATA, 0, stream, &prefix));
        conn.send(&bytes).await.expect("sent");
        let answer = loop {
            let f = conn.next(PATIENCE).await.expect("an answer");
            if f.stream == stream && f.kind == HEADERS {
                break f;
            }
        };
        assert_eq!(
            answer.flags & END_STREAM,
            END_STREAM,
            "answered at once (trailers-only)"
        );
    }
    assert!(conn.answers_ping(PATIENCE).await, "the connection goes on");
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}
