//! The archive (CONTRACT §6a) through the `chargegate` binary: exports that append chunks, a
//! verification that names each tampered chunk, retention that purges only what the archive
//! holds, and 250,000 decisions to a directory and to an S3 server.

use std::{path::Path, process::Output, sync::Arc, time::Duration};

use chargegate::{
    backends::Backends,
    decision::{DecidedBy, Micros, Reason, Verdict},
    fanout::Hub,
    intake::NewRequest,
    token::{DriverToken, Fingerprinter},
};
use futures::StreamExt;
use object_store::ObjectStore;
use serde_json::Value as Json;

use crate::support::{
    STATION_A, STATION_B, TOKEN_GRANTED, TOKEN_UNKNOWN, TestDir, TestServer, authorize_as,
    backend::Value, binary, next_decisions, poll_until, s3_server, subscribe,
};

const KEY: &str = "test-token-hash-key";

/// `chargegate audit <args…>` on the test's store.
fn audit(dir: &TestDir, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = binary::chargegate();
    command
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(dir.data_dir());
    if let Some(url) = dir.store_url() {
        command.args(["--store-url", &url]);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    command.output().expect("run chargegate audit")
}

fn export(dir: &TestDir, to: &str, chunk: usize, env: &[(&str, String)]) -> String {
    let out = audit(
        dir,
        &[
            "export",
            "--until",
            "0s",
            "--to",
            to,
            "--max-chunk-decisions",
            &chunk.to_string(),
        ],
        env,
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "export failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}

/// `audit verify --archive`: whether it passed, and what it said.
fn verify(dir: &TestDir, archive: &str, env: &[(&str, String)]) -> (bool, String) {
    let out = audit(
        dir,
        &["verify", "--archive", archive, "--token-hash-key", KEY],
        env,
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => (true, said),
        Some(1) => (false, said),
        other => panic!("verify exited with {other:?}: {said}"),
    }
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn manifest(dir: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("a manifest"))
        .expect("manifest JSON")
}

fn chunk_files(manifest: &Json) -> Vec<String> {
    manifest["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| c["file"].as_str().unwrap().to_owned())
        .collect()
}

/// Makes `n` decisions (granted and refused in turn) with request ids `<prefix>-<i>`.
async fn decide(server: &TestServer, prefix: &str, n: usize) {
    let mut client = server.client().await;
    let mut watch = subscribe(&mut client, &[], "").await;
    for i in 0..n {
        let (station, token) = match i % 2 {
            0 => (STATION_A, TOKEN_GRANTED),
            _ => (STATION_B, TOKEN_UNKNOWN),
        };
        authorize_as(&mut client, station, token, &format!("{prefix}-{i}"))
            .await
            .expect("authorize");
    }
    next_decisions(&mut watch, n).await;
}

#[tokio::test]
async fn exports_append_chunks_and_verify_names_each_tampered_chunk() {
    let dir = TestDir::new();
    let archive = dir.path().join("archive");
    let url = file_url(&archive);
    let server = TestServer::start(dir.config()).await;
    decide(&server, "first", 30).await;

    // While the server runs: 30 decisions in chunks of at most 7.
    let said = export(&dir, &url, 7, &[]);
    assert!(said.contains("exported 30 decisions in 5 chunks"), "{said}");
    let first = manifest(&archive);
    let counts: Vec<u64> = first["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [7, 7, 7, 7, 2]);
    let (ok, said) = verify(&dir, &url, &[]);
    assert!(
        ok && said.contains("intact: 30 archived decisions in 5 chunks"),
        "{said}"
    );

    // A second export adds chunks and leaves the ones written untouched.
    let before: Vec<Vec<u8>> = chunk_files(&first)
        .iter()
        .map(|f| std::fs::read(archive.join(f)).unwrap())
        .collect();
    decide(&server, "second", 10).await;
    let said = export(&dir, &url, 7, &[]);
    assert!(said.contains("exported 10 decisions in 2 chunks"), "{said}");
    let said = export(&dir, &url, 7, &[]);
    assert!(said.contains("nothing to export"), "{said}");
    let second = manifest(&archive);
    let files = chunk_files(&second);
    assert_eq!(files.len(), 7);
    assert_eq!(files[..5], chunk_files(&first)[..]);
    for (file, bytes) in files.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(archive.join(file)).unwrap(),
            bytes,
            "{file} was rewritten"
        );
    }
    // A chunk holds JSON lines of decisions with their links, never a token.
    let lines =
        zstd::stream::decode_all(&std::fs::read(archive.join(&files[0])).unwrap()[..]).unwrap();
    let text = String::from_utf8(lines).unwrap();
    let line: Json = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for field in [
        "cursor",
        "request_id",
        "station_id",
        "status",
        "reason",
        "driver_token_fingerprint",
        "accepted_at",
        "decided_at",
        "processing_time_ms",
        "link",
    ] {
        assert!(!line[field].is_null(), "{field} missing from {line}");
    }
    assert!(!text.contains(TOKEN_GRANTED) && !text.contains(TOKEN_UNKNOWN));

    // Decisions after the archive are checked in the live log, chained on from the last chunk.
    decide(&server, "live", 3).await;
    let (ok, said) = verify(&dir, &url, &[]);
    assert!(
        ok && said.contains("40 archived decisions in 7 chunks, then 3 in the live log"),
        "{said}"
    );
    server.stop().await.expect("clean stop");

    let tampered = |file: &str, why: &str| {
        let (ok, said) = verify(&dir, &url, &[]);
        assert!(!ok, "verify passed with {why}: {said}");
        assert!(said.contains(&format!("chunk {file}")), "{why}: {said}");
        said
    };
    let restore = |file: &str, bytes: &[u8]| std::fs::write(archive.join(file), bytes).unwrap();

    // An edited byte.
    let original = std::fs::read(archive.join(&files[1])).unwrap();
    let mut edited = original.clone();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x01;
    restore(&files[1], &edited);
    let said = tampered(&files[1], "an edited byte");
    assert!(said.contains("SHA-256"), "{said}");
    restore(&files[1], &original);

    // A missing chunk.
    std::fs::remove_file(archive.join(&files[2])).unwrap();
    let said = tampered(&files[2], "a missing chunk");
    assert!(said.contains("missing"), "{said}");
    restore(&files[2], &before[2]);

    // A record edited, recompressed and its digest put in the manifest: the chain breaks.
    let manifest_bytes = std::fs::read(archive.join("manifest.json")).unwrap();
    let plain = String::from_utf8(
        zstd::stream::decode_all(&std::fs::read(archive.join(&files[3])).unwrap()[..]).unwrap(),
    )
    .unwrap();
    let forged = plain.replacen(
        "\"status\":\"not_allowed\",\"reason\":\"no_grant\"",
        "\"status\":\"allowed\",\"reason\":\"granted\"",
        1,
    );
    assert_ne!(forged, plain);
    let forged = zstd::stream::encode_all(forged.as_bytes(), 3).unwrap();
    restore(&files[3], &forged);
    rehash(&archive, 3, &forged);
    let said = tampered(&files[3], "a forged record");
    assert!(said.contains("chain breaks"), "{said}");
    restore(&files[3], &before[3]);
    std::fs::write(archive.join("manifest.json"), &manifest_bytes).unwrap();

    // A chunk from another log, in place of one of ours: its digest differs, and with the
    // manifest's digest changed too its decisions belong to another log.
    let other = TestDir::new();
    let other_server = TestServer::start(other.config()).await;
    decide(&other_server, "other", 7).await;
    other_server.stop().await.expect("clean stop");
    let other_archive = other.path().join("archive");
    export(&other, &file_url(&other_archive), 7, &[]);
    let foreign =
        std::fs::read(other_archive.join(&chunk_files(&manifest(&other_archive))[0])).unwrap();
    restore(&files[0], &foreign);
    let said = tampered(&files[0], "another log's chunk");
    assert!(said.contains("SHA-256"), "{said}");
    rehash(&archive, 0, &foreign);
    let said = tampered(&files[0], "another log's chunk with its digest");
    assert!(said.contains("belongs to log"), "{said}");
    restore(&files[0], &before[0]);
    std::fs::write(archive.join("manifest.json"), &manifest_bytes).unwrap();

    let (ok, said) = verify(&dir, &url, &[]);
    assert!(ok, "restored, the archive verifies again: {said}");

    // Another log's store is not this archive's to verify or to extend.
    let (ok, said) = verify(&other, &url, &[]);
    assert!(!ok && said.contains("the live log"), "{said}");
    let out = audit(&other, &["export", "--until", "0s", "--to", &url], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("archive each log to a place of its own")
    );
}

/// Puts `bytes`' digest in the manifest for chunk `index`, as a forger with write access would.
fn rehash(archive: &Path, index: usize, bytes: &[u8]) {
    use sha2::Digest;
    let mut m = manifest(archive);
    m["chunks"][index]["sha256"] = Json::String(hex::encode(sha2::Sha256::digest(bytes)));
    std::fs::write(
        archive.join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
}

#[tokio::test]
async fn retention_with_an_archive_purges_only_what_the_archive_holds() {
    let dir = TestDir::new();
    let archive = dir.path().join("archive");
    let url = file_url(&archive);
    let server = TestServer::start(dir.config()).await;
    decide(&server, "ret", 10).await;
    server.stop().await.expect("clean stop");

    // All ten are older than retention; the first five older still. (Editing decided_at breaks
    // their links, which this test does not verify.)
    let now = Micros::now().0;
    for i in 0..10 {
        let hours: i64 = if i < 5 { 72 } else { 60 };
        dir.sql_execute(
            "UPDATE decisions SET decided_at_us = $1, accepted_at_us = $1 WHERE request_id = $2",
            &[
                Value::Int(now - hours * 3_600_000_000),
                Value::Text(format!("ret-{i}")),
            ],
        );
    }
    let out = audit(
        &dir,
        &[
            "export",
            "--until",
            "66h",
            "--to",
            &url,
            "--max-chunk-decisions",
            "5",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(chunk_files(&manifest(&archive)).len(), 1);

    // The archive refuses retention's next chunk (a directory stands where it would go).
    let (sixth, tenth) = {
        let m = manifest(&archive);
        let last =
            chargegate::cursor::Cursor::decode(m["chunks"][0]["last_cursor"].as_str().unwrap())
                .unwrap();
        (
            chargegate::cursor::Cursor::new(last.log_id, last.position + 1),
            chargegate::cursor::Cursor::new(last.log_id, last.position + 5),
        )
    };
    let blocked = archive.join(format!("decisions-{sixth}-{tenth}.jsonl.zst"));
    std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();

    let mut config = dir.config();
    config.audit_retention_days = 1;
    config.audit_archive_url = Some(url.clone());
    let server = TestServer::start(config.clone()).await;
    poll_until(
        "the archived decisions purged",
        || purged(&server, 0..5),
        |gone| gone.iter().all(|g| *g),
    )
    .await;
    // Had the rest been allowed, they would have gone in the same transaction.
    assert_eq!(purged(&server, 5..10).await, [false; 5]);
    server.stop().await.expect("clean stop");

    // With the way clear, the next run archives the rest and then purges it.
    std::fs::remove_dir_all(&blocked).unwrap();
    let server = TestServer::start(config).await;
    poll_until(
        "the rest archived and purged",
        || purged(&server, 5..10),
        |gone| gone.iter().all(|g| *g),
    )
    .await;
    let m = manifest(&archive);
    assert_eq!(chunk_files(&m).len(), 2);
    assert_eq!(m["chunks"][1]["count"].as_u64(), Some(5));
    server.stop().await.expect("clean stop");
}

/// Whether each of `ret-<i>` is gone from the log (`GetDecision` answers NOT_FOUND).
async fn purged(server: &TestServer, ids: std::ops::Range<usize>) -> Vec<bool> {
    let mut client = server.client().await;
    let mut gone = Vec::new();
    for i in ids {
        let answer = client
            .get_decision(chargegate::proto::GetDecisionRequest {
                request_id: format!("ret-{i}"),
            })
            .await;
        gone.push(answer.is_err_and(|s| s.code() == tonic::Code::NotFound));
    }
    gone
}

/// Records `n` decisions through the store's own write path (the intake's decided-at-once
/// commit, chained as the server chains them): 250,000 through gRPC would take minutes in a
/// debug build.
async fn record_directly(dir: &TestDir, n: usize) {
    let config = dir.config();
    let fingerprinter = Fingerprinter::new(KEY.as_bytes()).unwrap();
    let backends = Backends::open(
        &config,
        Arc::new(Hub::new()),
        &fingerprinter,
        Duration::from_secs(30),
    )
    .await
    .expect("open the store");
    let tokens = [TOKEN_GRANTED, TOKEN_UNKNOWN].map(|t| {
        let token = DriverToken::new(t);
        let fp = fingerprinter.fingerprint(&token);
        (token, fp)
    });
    let queue = backends.queue.clone();
    futures::stream::iter(0..n)
        .map(|i| {
            let queue = queue.clone();
            let (token, fingerprint) = tokens[i % 2].clone();
            async move {
                let request = NewRequest {
                    request_id: format!("bulk-{i}"),
                    station_id: [STATION_A, STATION_B][i % 2].to_owned(),
                    token,
                    fingerprint,
                    callback_url: None,
                    accepted_at: Micros::now(),
                };
                let reason = [Reason::Granted, Reason::NoGrant][i % 2];
                queue
                    .enqueue_decided(request, Verdict::new(reason, DecidedBy::Acl))
                    .await
                    .expect("record")
            }
        })
        .buffer_unordered(512)
        .for_each(|_| async {})
        .await;
    backends.close().await;
}

#[tokio::test]
async fn a_quarter_million_decisions_export_to_a_directory_and_to_s3_and_verify() {
    if crate::support::backend::sqlite_only(
        "the volume is the embedded store's; the archive code path is the same on PostgreSQL (tested above)",
    ) {
        return;
    }
    let dir = TestDir::new();
    record_directly(&dir, 250_000).await;

    let archive = dir.path().join("archive");
    let url = file_url(&archive);
    let started = std::time::Instant::now();
    let said = export(&dir, &url, 100_000, &[]);
    eprintln!(
        "exported 250,000 decisions to a directory in {:?}",
        started.elapsed()
    );
    assert!(
        said.contains("exported 250000 decisions in 3 chunks"),
        "{said}"
    );
    let m = manifest(&archive);
    let counts: Vec<u64> = m["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [100_000, 100_000, 50_000]);
    let (ok, said) = verify(&dir, &url, &[]);
    assert!(
        ok && said.contains("intact: 250000 archived decisions in 3 chunks"),
        "{said}"
    );

    if !s3_server::available() {
        return;
    }
    let s3 = s3_server::S3Server::start("audit-archive").await;
    let env = s3.env();
    let s3_url = "s3://audit-archive/chargegate/eu-1";
    let said = export(&dir, s3_url, 100_000, &env);
    assert!(
        said.contains("exported 250000 decisions in 3 chunks"),
        "{said}"
    );
    let (ok, said) = verify(&dir, s3_url, &env);
    assert!(
        ok && said.contains("intact: 250000 archived decisions in 3 chunks"),
        "{said}"
    );
    // The same chunks, byte for byte, under the prefix.
    let bucket = s3.client("audit-archive");
    let key = |chunk: &str| object_store::path::Path::from(format!("chargegate/eu-1/{chunk}"));
    for chunk in chunk_files(&m) {
        let got = bucket.get(&key(&chunk)).await.expect(&chunk);
        assert_eq!(
            got.bytes().await.unwrap(),
            std::fs::read(archive.join(&chunk)).unwrap()
        );
    }
    // A chunk edited in the bucket is named there too.
    let victim = &chunk_files(&m)[1];
    bucket
        .put(&key(victim), b"not a chunk".to_vec().into())
        .await
        .unwrap();
    let (ok, said) = verify(&dir, s3_url, &env);
    assert!(!ok && said.contains(&format!("chunk {victim}")), "{said}");
}
