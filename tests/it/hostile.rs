//! Hostile peers: each attack on loopback, bounded in count and time, and after each the server is
//! healthy and still answers another client.

use std::time::Duration;

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
