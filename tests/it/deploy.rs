//! `deploy/` as shipped: the manifests parse, every `CHARGEGATE_*` variable they set is a key
//! chargegate knows, and the Kubernetes objects say what the README promises (gRPC probes on
//! `grpc.health.v1`, a grace period above `shutdown_grace_ms`, keys from a Secret).

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn load(relative: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy().join(relative)).expect(relative);
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{relative} parses: {e}"))
}

/// Every string in `doc`, keys included.
fn strings<'a>(doc: &'a Yaml, out: &mut Vec<&'a str>) {
    match doc {
        Yaml::String(s) => out.push(s),
        Yaml::Array(items) => items.iter().for_each(|i| strings(i, out)),
        Yaml::Hash(map) => map.iter().for_each(|(k, v)| {
            strings(k, out);
            strings(v, out);
        }),
        _ => {}
    }
}

/// The `CHARGEGATE_*` names `docs` set, each checked against the settings list.
fn assert_known_variables(file: &str, docs: &[Yaml]) -> usize {
    let known: Vec<String> = chargegate::settings::SETTINGS
        .iter()
        .map(|s| s.env())
        .collect();
    let mut found = Vec::new();
    for doc in docs {
        strings(doc, &mut found);
    }
    let names: Vec<&str> = found
        .into_iter()
        .filter(|s| {
            s.starts_with("CHARGEGATE_") && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .collect();
    for name in &names {
        assert!(
            known.iter().any(|k| k == name),
            "{file} sets {name}, which is not a chargegate setting"
        );
    }
    names.len()
}

fn kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("a {kind}"))
}

#[test]
fn the_kubernetes_manifests_parse_and_probe_health_over_grpc() {
    let docs = load("kubernetes/chargegate.yaml");
    assert!(assert_known_variables("chargegate.yaml", &docs) >= 5);
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"].as_str(),
        Some("")
    );
    assert_eq!(
        container["livenessProbe"]["grpc"]["service"].as_str(),
        Some(chargegate::health::LIVENESS)
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(50051),
            "{probe}"
        );
    }
    let env = container["env"].as_vec().expect("env");
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{name} is set"))
    };
    for secret in [
        "CHARGEGATE_STORE_URL",
        "CHARGEGATE_QUEUE_URL",
        "CHARGEGATE_TOKEN_HASH_KEY",
    ] {
        assert_eq!(
            value(secret)["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("chargegate"),
            "{secret} comes from the Secret"
        );
    }
    let grace_ms: i64 = value("CHARGEGATE_SHUTDOWN_GRACE_MS")["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("shutdown_grace_ms");
    let termination = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("a grace period");
    assert!(
        termination * 1000 > grace_ms,
        "terminationGracePeriodSeconds ({termination} s) above shutdown_grace_ms ({grace_ms} ms)"
    );
    for k in ["Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"] {
        kind(&docs, k);
    }
    let secret = load("kubernetes/secret.example.yaml");
    let keys = &kind(&secret, "Secret")["stringData"];
    for key in ["store_url", "queue_url", "token_hash_key"] {
        assert!(keys[key].as_str().is_some(), "the example Secret has {key}");
    }
}

#[test]
fn the_compose_file_parses_and_runs_three_instances_on_postgresql_and_redis() {
    let docs = load("compose.yaml");
    assert!(assert_known_variables("compose.yaml", &docs) >= 4);
    let services = docs[0]["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for needed in ["postgres", "redis", "gateway"] {
        assert!(names.contains(&needed), "compose runs {needed}");
    }
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("chargegate-"))
            .count(),
        3,
        "three instances"
    );
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).expect("Dockerfile");
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")),
        2,
        "two stages"
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root") && !l.contains(" 0")),
        "runs as a user of its own"
    );
}
