//! `Cargo.lock` holds no h2, hyper, rustls or tonic older than the fixes for their known
//! advisories (the HTTP/2 and TLS stack every peer talks to). A new advisory adds a row here.

/// Crate, the first version with every fix, the advisories it fixes.
const FLOORS: &[(&str, (u64, u64, u64), &str)] = &[
    (
        "h2",
        (0, 4, 4),
        "RUSTSEC-2024-0003 (reset flood), RUSTSEC-2024-0332 (CONTINUATION flood)",
    ),
    (
        "hyper",
        (1, 0, 0),
        "the 0.14 advisories (request smuggling, RUSTSEC-2021-0078/0079)",
    ),
    (
        "rustls",
        (0, 23, 5),
        "RUSTSEC-2024-0336 (complete_io loops on a close_notify)",
    ),
    (
        "tonic",
        (0, 12, 3),
        "RUSTSEC-2024-0376 (a connection error stopped the accept loop)",
    ),
];

fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Each package of `lock` below its floor, with the advisories it lacks.
fn below_floors(lock: &str) -> Vec<String> {
    let lock: toml::Table = toml::from_str(lock).expect("Cargo.lock parses");
    let packages = lock["package"].as_array().expect("packages");
    let mut found = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or("");
        let v = package["version"].as_str().unwrap_or("");
        for (crate_name, floor, fixes) in FLOORS {
            if name == *crate_name && version(v) < *floor {
                found.push(format!("{name} {v} (needs {floor:?}: {fixes})"));
            }
        }
    }
    found
}

#[test]
fn the_lock_file_holds_no_http2_or_tls_crate_with_a_known_advisory() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("Cargo.lock");
    assert_eq!(below_floors(&lock), Vec::<String>::new());
    for (name, _, _) in FLOORS {
        assert!(
            lock.contains(&format!("name = \"{name}\"")),
            "{name} is in the lock file"
        );
    }
    // The check sees an old version.
    let old = "version = 4\n\n[[package]]\nname = \"h2\"\nversion = \"0.4.1\"\n\n[[package]]\nname = \"rustls\"\nversion = \"0.23.4\"\n";
    let found = below_floors(old);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("RUSTSEC-2024-0003"));
}
