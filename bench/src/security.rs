//! What the security layers cost: t1 (TLS and a bearer token against plaintext) and t2 (a rate
//! limit under 2× overload).

use std::{sync::atomic::Ordering, time::Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

use crate::{
    load::{self, Caller, ms},
    scenarios::{Bench, round_robin_request, round3},
};

/// A CA, a server certificate for localhost and 127.0.0.1, and a clients file of `clients`
/// (name, own rate) with a token each, written under `dir`.
struct Pki {
    ca: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    clients: std::path::PathBuf,
    tokens: Vec<String>,
}

impl Pki {
    fn new(dir: &std::path::Path, clients: &[(&str, Option<u32>)]) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "bench ca");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&key, &ca)?;
        let paths = (
            dir.join("tls.crt"),
            dir.join("tls.key"),
            dir.join("clients.toml"),
        );
        std::fs::write(&paths.0, cert.pem())?;
        std::fs::write(&paths.1, key.serialize_pem())?;
        let mut text = String::new();
        let mut tokens = Vec::new();
        for (name, rate) in clients {
            let (token, digest) = chargegate::security::clients::new_token();
            text.push_str(&format!(
                "[[client]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\nstations = [\"*\"]\nroles = [\"station\"]\n"
            ));
            if let Some(rate) = rate {
                text.push_str(&format!("rate = {{ per_second = {rate} }}\n"));
            }
            tokens.push(token);
        }
        std::fs::write(&paths.2, text)?;
        for p in [&paths.1, &paths.2] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(Self {
            ca: ca.pem(),
            cert: paths.0,
            key: paths.1,
            clients: paths.2,
            tokens,
        })
    }
}

impl Bench {
    /// t1: g1 (closed loop, C=200 over 8 connections) over TLS with a bearer token checked
    /// against a clients file, beside g1 in plaintext with no clients file, in four alternating
    /// rounds (one with `--quick`); the figure is the median of the rounds' ratios. Target ≥ 0.85.
    pub async fn t1(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("t1", json!({"skipped": "starts servers of its own"}));
            return Ok(());
        }
        let (c, k) = (200, 8);
        let (warmup, measure) = (self.warmup(), self.measure(10));
        let rounds = if self.quick { 1 } else { 4 };
        let mut rows = Vec::new();
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let dir = self.fresh_dir(&format!("t1-plain-{round}"));
            let server = self.chargegate_on(&dir, &[])?;
            let channels = load::connect(&server.url, k).await?;
            let plain =
                load::closed_loop(&channels, c, warmup, measure, round_robin_request()).await;
            server.stop();

            let dir = self.fresh_dir(&format!("t1-tls-{round}"));
            let pki = Pki::new(&dir, &[("bench", None)])?;
            let (cert, key, clients) = (
                pki.cert.display().to_string(),
                pki.key.display().to_string(),
                pki.clients.display().to_string(),
            );
            let server = self.chargegate_on(
                &dir,
                &[
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--clients-file",
                    &clients,
                ],
            )?;
            let caller = Caller {
                token: Some(pki.tokens[0].clone()),
                ca: Some(pki.ca.clone()),
            };
            let url = server.url.replacen("http://", "https://", 1);
            let channels = load::connect_as(&url, k, &caller).await?;
            let secure =
                load::closed_loop(&channels, c, warmup, measure, round_robin_request()).await;
            server.stop();
            ratios.push(secure.rps / plain.rps.max(1.0));
            rows.push(json!({
                "plaintext_rps": plain.rps.round(), "tls_bearer_rps": secure.rps.round(),
                "ratio": round3(secure.rps / plain.rps.max(1.0)),
                "plaintext_p99_ms": ms(plain.hist.value_at_quantile(0.99)),
                "tls_bearer_p99_ms": ms(secure.hist.value_at_quantile(0.99)),
                "errors": plain.errors + secure.errors,
            }));
        }
        ratios.sort_by(f64::total_cmp);
        let median = (ratios[(ratios.len() - 1) / 2] + ratios[ratios.len() / 2]) / 2.0;
        self.record(
            "t1",
            json!({ "concurrency": c, "connections": k, "median_ratio": round3(median), "rounds": rows }),
        );
        Ok(())
    }

    /// t2: g8's overload (an open loop at twice the knee) from one client, while another client
    /// sends 500 calls/s, both with bearer tokens: once with the overloading client limited to
    /// half the knee (its own `rate` in the clients file), once without a limit. The goodput of
    /// the admitted calls, and the other client's p99.
    pub async fn t2(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            self.record("t2", json!({"skipped": "starts servers of its own"}));
            return Ok(());
        }
        let knee = self.knee_rps().await?;
        let rate = (2.0 * knee).round();
        let limit = (knee / 2.0).round().max(1.0) as u32;
        let measure = self.measure(20);
        let warmup = self.warmup();
        let mut rows = Vec::new();
        for limited in [false, true] {
            let dir = self.fresh_dir(if limited { "t2-limited" } else { "t2-open" });
            let pki = Pki::new(
                &dir,
                &[("flood", limited.then_some(limit)), ("other", None)],
            )?;
            let clients = pki.clients.display().to_string();
            let server = self.chargegate_on(&dir, &["--clients-file", &clients])?;
            let as_client = |i: usize| Caller {
                token: Some(pki.tokens[i].clone()),
                ca: None,
            };
            let flood = load::connect_as(&server.url, 8, &as_client(0)).await?;
            let other = load::connect_as(&server.url, 1, &as_client(1)).await?;
            let start = Instant::now();
            let (f, o) = tokio::join!(
                load::open_loop(
                    &flood,
                    rate,
                    start,
                    warmup,
                    measure,
                    crate::scenarios::OVERLOAD_IN_FLIGHT,
                    round_robin_request(),
                ),
                load::open_loop(
                    &other,
                    500.0,
                    start,
                    warmup,
                    measure,
                    1_000,
                    round_robin_request()
                ),
            );
            server.stop();
            let goodput = f.ok() as f64 / measure.as_secs_f64();
            rows.push(json!({
                "limited": limited,
                "flood_limit_per_s": limited.then_some(limit),
                "flood_offered_rps": rate, "flood_goodput_rps": goodput.round(),
                "flood_goodput_ratio_to_knee": round3(goodput / knee),
                "flood_rejected": f.rejected(),
                "flood_ok_p99_ms": ms(f.hist.value_at_quantile(0.99)),
                "other_ok": o.ok(), "other_rejected": o.rejected(),
                "other_client_dropped": o.outcomes.client_dropped.load(Ordering::Relaxed),
                "other_p50_ms": ms(o.hist.value_at_quantile(0.5)),
                "other_p99_ms": ms(o.hist.value_at_quantile(0.99)),
            }));
        }
        let p99 = |i: usize| rows[i]["other_p99_ms"].as_f64().unwrap_or(0.0);
        let ratio = round3(p99(1) / p99(0).max(0.001));
        self.record(
            "t2",
            json!({ "knee_rps": knee.round(), "runs": rows, "other_p99_limited_over_open": ratio }),
        );
        Ok(())
    }
}
