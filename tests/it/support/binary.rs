//! The real `chargegate` binary as a child process, for signal and crash tests.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// The `chargegate` binary, with none of the `CHARGEGATE_*` variables of the shell that runs the
/// tests: a developer's exported settings must not change what a test starts.
pub fn chargegate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chargegate"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CHARGEGATE_") {
            command.env_remove(name);
        }
    }
    command
}

pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// The metrics listener's address, when started with one ([`ChildServer::start_with_metrics`]).
    pub metrics: Option<SocketAddr>,
    /// The lines logged until it served (the rest come through `log`).
    pub start_log: Vec<String>,
    /// Every line the child logged, for scans.
    pub log: mpsc::Receiver<String>,
}

impl ChildServer {
    /// Starts the binary with `args` and waits until it logs the address it serves on.
    pub fn start(dir: &super::TestDir, acl: &Path, extra: &[&str]) -> Self {
        Self::start_as(dir, acl, extra, "off", None)
    }

    /// Like [`ChildServer::start`], with the metrics listener on an ephemeral port.
    pub fn start_with_metrics(dir: &super::TestDir, acl: &Path, extra: &[&str]) -> Self {
        Self::start_as(dir, acl, extra, "127.0.0.1:0", None)
    }

    /// Like [`ChildServer::start`], armed to abort at the failpoint `name`
    /// (`chargegate::failpoint`).
    pub fn start_with_failpoint(
        dir: &super::TestDir,
        acl: &Path,
        extra: &[&str],
        name: &str,
    ) -> Self {
        Self::start_as(dir, acl, extra, "off", Some(name))
    }

    fn start_as(
        dir: &super::TestDir,
        acl: &Path,
        extra: &[&str],
        metrics_listen: &str,
        failpoint: Option<&str>,
    ) -> Self {
        let mut command = chargegate();
        if let Some(name) = failpoint {
            command.env("CHARGEGATE_FAILPOINT", name);
        }
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                metrics_listen,
            ])
            .args(dir.store_flags())
            .arg("--acl-file")
            .arg(acl)
            .args(extra)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chargegate");
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let deadline = std::time::Instant::now() + super::PATIENCE;
        let mut metrics = None;
        let mut start_log = Vec::new();
        let address = |line: &str, field: &str| -> Option<SocketAddr> {
            let value = line.split(field).nth(1)?.split_whitespace().next()?;
            Some(value.parse().expect("an address"))
        };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                let status = child.try_wait();
                panic!("chargegate did not report its address (exit: {status:?})")
            });
            if line.contains("metrics listening") {
                metrics = address(&line, "addr=");
            }
            let served = address(&line, "listen=");
            start_log.push(line);
            if let Some(addr) = served {
                return Self {
                    child,
                    addr,
                    metrics,
                    start_log,
                    log: rx,
                };
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `/metrics` as a scrape sees it (started with [`ChildServer::start_with_metrics`]).
    pub fn scrape_metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics.expect("metrics address"));
        // On a thread of its own: callers may be inside a runtime.
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                reqwest::get(&url)
                    .await
                    .expect("scrape")
                    .text()
                    .await
                    .expect("body")
            })
        })
        .join()
        .expect("the scrape thread")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the child to exit; returns its exit code.
    pub fn wait(&mut self, patience: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "chargegate did not exit within {patience:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every line logged so far.
    pub fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
