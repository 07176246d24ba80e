//! Decision streams: station filtering, replay from a cursor, heartbeats, lagging subscribers.

use std::{collections::HashSet, time::Duration};

use chargegate::proto::subscribe_decisions_response::Event;
use tonic::Code;

use crate::support::*;

fn station(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_gets_exactly_its_stations() {
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    const STATIONS: usize = 12;
    const PER_STATION: usize = 5;
    let mut single = Vec::new();
    for i in 0..STATIONS {
        let mut c = server.client().await;
        single.push(subscribe(&mut c, &[&station(i)], "").await);
    }
    let (s0, s1) = (station(0), station(1));
    let mut pair = subscribe(&mut client, &[&s0, &s1.to_uppercase(), &s1], "").await;
    let mut all = subscribe(&mut client, &[], "").await;

    for round in 0..PER_STATION {
        for i in 0..STATIONS {
            let token = if (i + round) % 2 == 0 {
                TOKEN_WILDCARD
            } else {
                TOKEN_UNKNOWN
            };
            authorize(&mut client, &station(i), token).await;
        }
    }
    for (i, stream) in single.iter_mut().enumerate() {
        let got = next_decisions(stream, PER_STATION).await;
        assert!(
            got.iter().all(|d| d.station_id == station(i)),
            "subscriber {i} got another station"
        );
    }
    let got = next_decisions(&mut pair, 2 * PER_STATION).await;
    assert!(got.iter().all(|d| d.station_id == s0 || d.station_id == s1));
    let ids: HashSet<_> = got.iter().map(|d| d.request_id.clone()).collect();
    assert_eq!(
        ids.len(),
        2 * PER_STATION,
        "a station named twice is delivered once"
    );
    let got = next_decisions(&mut all, STATIONS * PER_STATION).await;
    let cursors: Vec<_> = got.iter().map(|d| d.cursor.clone()).collect();
    assert_eq!(cursors.iter().collect::<HashSet<_>>().len(), got.len());

    // Nothing more arrives for a single-station subscriber: the next decision is the marker.
    let marker = authorize(&mut client, &station(3), TOKEN_WILDCARD).await;
    assert_eq!(
        next_decision(&mut single[3]).await.request_id,
        marker.request_id
    );
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_cursor_then_live_without_gap_or_duplicate() {
    let dir = TestDir::new();
    let mut server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut live = subscribe(&mut client, &[STATION_A], "").await;
    let mut acks = Vec::new();
    for _ in 0..6 {
        acks.push(
            authorize(&mut client, STATION_A, TOKEN_GRANTED)
                .await
                .request_id,
        );
        authorize(&mut client, STATION_B, TOKEN_WILDCARD).await;
    }
    let first = next_decisions(&mut live, 6).await;
    let mut decided: Vec<_> = first.iter().map(|d| d.request_id.clone()).collect();
    decided.sort();
    let mut sorted_acks = acks.clone();
    sorted_acks.sort();
    assert_eq!(decided, sorted_acks);

    // Resume after the second decision: the four after it (station A only), then live ones.
    let mut resumed = subscribe(&mut client, &[STATION_A], &first[1].cursor).await;
    let replayed = next_decisions(&mut resumed, 4).await;
    assert_eq!(
        replayed,
        first[2..].to_vec(),
        "replay is in log order and matches what was streamed live"
    );
    let later = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    let next = next_decision(&mut resumed).await;
    assert_eq!(
        next.request_id, later.request_id,
        "then live, with no duplicate at the seam"
    );

    // Bad cursors.
    let status = client
        .subscribe_decisions(chargegate::proto::SubscribeDecisionsRequest {
            station_ids: vec![],
            after_cursor: "garbage!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut ahead = chargegate::cursor::Cursor::decode(&next.cursor).unwrap();
    ahead.position += 1000;
    let status = client
        .subscribe_decisions(chargegate::proto::SubscribeDecisionsRequest {
            station_ids: vec![],
            after_cursor: ahead.encode(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    let mut foreign = ahead;
    foreign.log_id ^= 1;
    foreign.position = 1;
    let status = client
        .subscribe_decisions(chargegate::proto::SubscribeDecisionsRequest {
            station_ids: vec![],
            after_cursor: foreign.encode(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // At shutdown the stream ends with UNAVAILABLE; after a restart the cursor still resumes.
    server.begin_shutdown();
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match resumed.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the stream ends at shutdown");
    assert_eq!(end, Some(Code::Unavailable));
    server.stop().await.expect("clean stop");

    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut resumed = subscribe(&mut client, &[STATION_A], &first[4].cursor).await;
    let replayed = next_decisions(&mut resumed, 2).await;
    assert_eq!(replayed[0], first[5]);
    assert_eq!(replayed[1].request_id, later.request_id);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_get_heartbeats_with_a_resumable_cursor() {
    let dir = TestDir::new();
    let mut config = dir.config();
    config.heartbeat_interval = Duration::from_millis(200);
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // A decision for another station moves the log; the heartbeat of station A's stream covers it.
    authorize(&mut client, STATION_B, TOKEN_WILDCARD).await;
    let mut other = subscribe(&mut client, &[STATION_B], "").await;
    authorize(&mut client, STATION_B, TOKEN_WILDCARD).await;
    let b = next_decision(&mut other).await;
    let mut stream = subscribe(&mut client, &[STATION_A], "").await;
    let beat = loop {
        let item = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("heartbeat")
            .unwrap()
            .unwrap();
        if let Some(Event::Heartbeat(h)) = item.event {
            break h;
        }
    };
    assert!(beat.at.is_some());
    let beat_cursor = chargegate::cursor::Cursor::decode(&beat.cursor).unwrap();
    assert!(beat_cursor >= chargegate::cursor::Cursor::decode(&b.cursor).unwrap());
    // Resuming from the heartbeat's cursor misses nothing that comes after it.
    let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    let mut resumed = subscribe(&mut client, &[STATION_A], &beat.cursor).await;
    assert_eq!(next_decision(&mut resumed).await.request_id, ack.request_id);
    server.stop().await.expect("clean stop");
}

/// A subscriber that reads nothing while many decisions flow still gets all of them, in order,
/// and a fast subscriber beside it is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_loses_nothing_and_slows_no_one() {
    const N: usize = 20_000;
    let dir = TestDir::new();
    let server = TestServer::start(dir.config()).await;
    let mut client = server.client().await;
    let mut stalled = subscribe(&mut client, &[STATION_A], "").await;
    let mut fast_client = server.client().await;
    let mut fast = subscribe(&mut fast_client, &[STATION_A], "").await;

    let catchups_before = catchups();
    let fast_reader = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(N);
        while ids.len() < N {
            ids.push(next_decision(&mut fast).await.request_id);
        }
        ids
    });
    // Load from several connections.
    let mut senders = Vec::new();
    for w in 0..8 {
        let mut c = server.client().await;
        senders.push(tokio::spawn(async move {
            for i in 0..N / 8 {
                let mut req = request(STATION_A, TOKEN_GRANTED);
                req.request_id = format!("lag-{w}-{i}");
                c.authorize(req).await.expect("authorize");
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let fast_ids = tokio::time::timeout(Duration::from_secs(120), fast_reader)
        .await
        .expect("the fast subscriber kept up while the other stalled")
        .expect("reader");
    // Only now does the stalled subscriber start reading.
    let mut stalled_ids = Vec::with_capacity(N);
    let mut last_cursor = None;
    while stalled_ids.len() < N {
        let d = next_decision(&mut stalled).await;
        let c = chargegate::cursor::Cursor::decode(&d.cursor).unwrap();
        assert!(
            last_cursor.is_none_or(|l| c > l),
            "in log order, no duplicates"
        );
        last_cursor = Some(c);
        stalled_ids.push(d.request_id);
    }
    assert_eq!(
        stalled_ids, fast_ids,
        "the stalled subscriber got every decision, in the same order"
    );
    assert_eq!(stalled_ids.iter().collect::<HashSet<_>>().len(), N);
    assert!(
        catchups() > catchups_before,
        "the stalled subscriber really lagged and caught up from the log"
    );
    server.stop().await.expect("clean stop");
}

/// Times a lagging subscriber caught up from the log, so far in this process.
fn catchups() -> u64 {
    metric("chargegate_subscriber_catchups_total") as u64
}

/// Retention purges old decisions (and their request keys); a cursor from before what the log
/// still holds is OUT_OF_RANGE, a cursor at the new start still resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_retention_is_out_of_range() {
    use chargegate::{
        cursor::Cursor,
        decision::{DecidedBy, Micros, NewDecision, Reason, Verdict},
        fanout::Hub,
        intake::NewRequest,
        token::{DriverToken, Fingerprinter},
    };
    let dir = TestDir::new();
    // Decisions made three days ago, written as a server then would have written them.
    let three_days_ago = Micros(Micros::now().0 - 3 * 86_400_000_000);
    let cursors = {
        std::fs::create_dir_all(dir.data_dir()).unwrap();
        let fingerprinter = Fingerprinter::new(b"test-token-hash-key").unwrap();
        let backends = chargegate::backends::Backends::open(
            &dir.config(),
            std::sync::Arc::new(Hub::new()),
            &fingerprinter,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let queue = backends.queue.clone();
        let mut cursors = Vec::new();
        for i in 0..3 {
            let token = DriverToken::new(TOKEN_GRANTED);
            let request = NewRequest {
                request_id: format!("old-{i}"),
                station_id: STATION_A.into(),
                fingerprint: fingerprinter.fingerprint(&token),
                token,
                callback_url: None,
                accepted_at: three_days_ago,
            };
            queue.enqueue(request.clone()).await.unwrap();
            let claim = queue.claim(1).await.unwrap().pop().unwrap();
            let decision = NewDecision {
                request_id: request.request_id,
                station_id: request.station_id,
                fingerprint: request.fingerprint,
                verdict: Verdict::new(Reason::Granted, DecidedBy::Acl),
                accepted_at: three_days_ago,
                decided_at: three_days_ago,
                revision: 0,
            };
            cursors.push(claim.ack(decision, false).await.unwrap().decision.cursor);
        }
        backends.close().await;
        cursors
    };
    let mut config = dir.config();
    config.audit_retention_days = 1;
    let server = TestServer::start(config.clone()).await;
    let mut client = server.client().await;
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let lookup = client
            .get_decision(chargegate::proto::GetDecisionRequest {
                request_id: "old-2".into(),
            })
            .await;
        if lookup.as_ref().is_err_and(|s| s.code() == Code::NotFound) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old decisions were never purged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, cursor) in [
        ("start of the log", Cursor::new(cursors[0].log_id, 0)),
        ("a purged decision", cursors[0]),
    ] {
        let status = client
            .subscribe_decisions(chargegate::proto::SubscribeDecisionsRequest {
                station_ids: vec![],
                after_cursor: cursor.encode(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{name}");
    }
    // The log is empty now. Started again, the server still numbers on after what it purged.
    server.stop().await.expect("clean stop");
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    // The newest purged position is where the retained log starts: resuming there misses nothing.
    let mut resumed = subscribe(&mut client, &[], &cursors[2].encode()).await;
    let ack = authorize(&mut client, STATION_A, TOKEN_GRANTED).await;
    assert_eq!(next_decision(&mut resumed).await.request_id, ack.request_id);
    // The purged request keys are forgotten with their decisions.
    let mut again = request(STATION_A, TOKEN_WILDCARD);
    again.request_id = "old-1".into();
    assert!(
        !client
            .authorize(again)
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );
    server.stop().await.expect("clean stop");
}
