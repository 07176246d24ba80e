//! Hostile peers: each attack on loopback, bounded in count and time, and after each the server is
//! healthy and still answers another client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A plaintext connection that sends `bytes` and then nothing: whether the server closed it
/// within `wait`.
async fn closes_after(server: &TestServer, bytes: &[u8], wait: Duration) -> bool {
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let _ = tcp.write_all(bytes).await;
    closed_within(&mut tcp, wait).await
}

/// What is not HTTP/2 is closed at once, long before the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_http1_and_a_tls_client_hello_are_closed_at_once() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.handshake_timeout = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let client_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xc4, 0x01, 0x00, 0x00, 0xc0, 0x03, 0x03, 0x5a, 0x5a, 0x5a,
    ];
    for (what, bytes) in [
        ("random bytes", random.as_slice()),
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(),
        ),
        ("a TLS ClientHello", client_hello),
    ] {
        assert!(
            closes_after(&server, bytes, Duration::from_secs(10)).await,
            "{what}: closed well before the 60 s handshake timeout"
        );
    }
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// Half a preface, or a preface a byte at a time (slowloris), holds a connection no longer
/// than the handshake timeout, and a good client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_or_slow_preface_is_cut_at_the_handshake_timeout() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.handshake_timeout = Duration::from_millis(1000);
    let server = TestServer::start(config).await;
    let mut half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&PREFACE[..10]).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut slow_read, mut slow_write) = slow.split();
    let dribble = async {
        for byte in PREFACE.iter().cycle().take(200) {
            if slow_write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let slow_closed = async {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            while matches!(slow_read.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await
        .is_ok()
    };
    let (_, slow_closed, (), half_closed) = tokio::join!(
        dribble,
        slow_closed,
        still_serves(&server),
        closed_within(&mut half, PATIENCE)
    );
    assert!(half_closed, "half a preface is cut");
    assert!(slow_closed, "a preface a byte at a time is cut");
    server.stop().await.expect("clean stop");
}

/// A gRPC call made by the `h2` crate with `body` as its request body: the `grpc-status` the
/// server answered with.
async fn h2_call(
    addr: std::net::SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> Result<String, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false)?;
    send.send_data(body.into(), true)?;
    let response = response.await?;
    if let Some(status) = response.headers().get("grpc-status") {
        return Ok(status.to_str().unwrap_or("").to_owned());
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk?;
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    Ok(trailers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default())
}

/// One gRPC message around `message`.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_and_invalid_utf8_are_refused_and_change_nothing() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut stream = subscribe(&mut server.client().await, &[], "").await;
    let path = "/chargegate.v1.ChargingAuthorization/Authorize";
    // Field 1 (station_id) says 5 bytes and brings 1; then field 1 as invalid UTF-8; then a
    // field number of 0.
    for (what, message) in [
        ("a truncated field", vec![0x0a, 0x05, b'a']),
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("field number 0", vec![0x02, 0x01, 0x00]),
    ] {
        let status = h2_call(server.addr, path, grpc_message(&message))
            .await
            .expect("answered");
        assert!(
            status == "13" || status == "3",
            "{what}: INTERNAL or INVALID_ARGUMENT, got grpc-status {status:?}"
        );
    }
    // Nothing was recorded: the first decision a subscriber sees is the next good call's.
    let mut client = server.client().await;
    let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(next_decision(&mut stream).await.request_id, ack.request_id);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_refused_and_the_server_goes_on() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    for size in [20 * 1024, 70 * 1024] {
        let mut client = server.client().await;
        let mut request = tonic::Request::new(request(STATION_A, TOKEN_GRANTED));
        request.metadata_mut().insert(
            "x-padding",
            "p".repeat(size).parse().expect("ascii metadata"),
        );
        let refused = client.authorize(request).await;
        assert!(refused.is_err(), "{size} bytes of metadata: {refused:?}");
    }
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// HEADERS without END_HEADERS, then CONTINUATION frames without end: the connection ends
/// once the header list passes its limit, long before a mebibyte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_ends_the_connection() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut conn = RawConnection::open(server.addr).await;
    let mut bytes = frame(
        HEADERS,
        0,
        1,
        &grpc_call("/chargegate.v1.ChargingAuthorization/Authorize"),
    );
    let field = hpack(&[("x-flood", &"f".repeat(100))]);
    for _ in 0..(1024 * 1024 / field.len()) {
        bytes.extend(frame(CONTINUATION, 0, 1, &field));
    }
    let _ = conn.send(&bytes).await;
    assert!(conn.closed_within(PATIENCE).await, "the connection ends");
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// The rapid reset of CVE-2023-44487 through the `h2` crate: requests opened and cancelled as
/// fast as the client can; another client is answered meanwhile and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_leaves_other_clients_served() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let flood = async {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = Some(client);
        let mut opened = 0;
        while let Some(idle) = client.take()
            && opened < 20_000
        {
            let Ok(mut ready) = idle.ready().await else {
                break;
            };
            let request = http::Request::post(
                "http://localhost/chargegate.v1.ChargingAuthorization/Authorize",
            )
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
            let Ok((_, mut send)) = ready.send_request(request, false) else {
                break;
            };
            send.send_reset(h2::Reason::CANCEL);
            opened += 1;
            client = Some(ready);
        }
        drop(client);
        let _ = tokio::time::timeout(PATIENCE, connection).await;
        opened
    };
    let (opened, ()) = tokio::join!(flood, still_serves(&server));
    assert!(opened > 0);
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// 10⁵ empty DATA frames on one stream: answered or cut, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_frames_by_the_hundred_thousand_cost_the_server_nothing_lasting() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut conn = RawConnection::open(server.addr).await;
    let mut bytes = frame(
        HEADERS,
        END_HEADERS,
        1,
        &grpc_call("/chargegate.v1.ChargingAuthorization/Authorize"),
    );
    let empty = frame(DATA, 0, 1, &[]);
    for _ in 0..100_000 {
        bytes.extend_from_slice(&empty);
    }
    bytes.extend(frame(DATA, END_STREAM, 1, &[]));
    let (_, ()) = tokio::join!(conn.send(&bytes), still_serves(&server));
    let answered_or_cut = async {
        loop {
            match conn.next(PATIENCE).await {
                Some(f) if f.stream == 1 && f.kind == HEADERS => return true,
                Some(_) => continue,
                None => return true,
            }
        }
    };
    assert!(
        tokio::time::timeout(PATIENCE, answered_or_cut)
            .await
            .is_ok(),
        "the stream is answered or the connection cut"
    );
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}

/// 300 subscriptions on one connection: 256 streams open (the rest wait on the client's side,
/// HTTP/2 backpressure), and another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_subscriptions_on_one_connection_leave_the_server_serving() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let channel = server.channel().await;
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let mut client =
            chargegate::proto::charging_authorization_client::ChargingAuthorizationClient::new(
                channel.clone(),
            );
        let opened_tx = opened_tx.clone();
        tasks.push(tokio::spawn(async move {
            let stream = subscribe(&mut client, &[STATION_A], "").await;
            let _ = opened_tx.send(());
            // Held open until the test ends.
            std::future::pending::<()>().await;
            drop(stream);
        }));
    }
    for n in 0..chargegate::server::STREAMS_PER_CONNECTION {
        tokio::time::timeout(PATIENCE, opened_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} subscriptions opened"));
    }
    still_serves(&server).await;
    for t in tasks {
        t.abort();
    }
    server.stop().await.expect("clean stop");
}

/// `max_connection_age_ms`: an old connection is sent GOAWAY, and closed after the grace even
/// with a decision stream open on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_is_sent_goaway() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.max_connection_age = Some(Duration::from_millis(1000));
    config.max_connection_age_grace = Duration::from_millis(500);
    let server = TestServer::start(config).await;
    let mut conn = RawConnection::open(server.addr).await;
    // A decision stream open on it: without the grace's end the connection would live on.
    let mut subscribe = frame(
        HEADERS,
        END_HEADERS,
        1,
        &grpc_call("/chargegate.v1.ChargingAuthorization/SubscribeDecisions"),
    );
    subscribe.extend(frame(DATA, END_STREAM, 1, &grpc_message(&[])));
    conn.send(&subscribe).await.unwrap();
    let goaway = async {
        loop {
            match conn.next(PATIENCE).await {
                Some(f) if f.kind == GOAWAY => return true,
                Some(f) if f.kind == SETTINGS && f.flags & ACK == 0 => {
                    let _ = conn.send(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                Some(_) => continue,
                None => return false,
            }
        }
    };
    assert!(goaway.await, "GOAWAY within patience");
    assert!(conn.closed_within(PATIENCE).await, "closed after the grace");
    still_serves(&server).await;
    server.stop().await.expect("clean stop");
}
