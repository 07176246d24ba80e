//! Processes and the machine: spawning the servers pinned to their own core, reading their
//! memory, the fsync probe, and what the machine is.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// Runs `command` to completion, pinned to `core` when given; returns what it printed.
pub fn run_pinned(command: Command, core: Option<usize>) -> anyhow::Result<String> {
    let mut command = match core {
        Some(core) => {
            let mut pinned = Command::new("taskset");
            pinned
                .arg("-c")
                .arg(core.to_string())
                .arg(command.get_program())
                .args(command.get_args());
            pinned
        }
        None => command,
    };
    let output = command.stderr(std::process::Stdio::inherit()).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{:?} failed: {}",
        command.get_program(),
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// CPU time (user and system) a process has used so far, from /proc (clock-tick resolution).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; 100 ticks a second.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of every process named `name` on this machine (`postgres`: the server and its
/// backends).
pub fn named_cpu_time(name: &str) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(cpu_time)
        .sum()
}

/// CPU time the whole machine spent busy (not idle, not waiting for I/O), and in all, summed
/// over its cores, from `/proc/stat`.
pub fn machine_cpu_time() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    // Clock ticks are 1/100 s on Linux.
    let ticks = |t: u64| Duration::from_millis(t * 10);
    (ticks(total - idle), ticks(total))
}

pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    pub pid: u32,
    _log: std::thread::JoinHandle<()>,
}

impl ServerProcess {
    /// Spawns `command` (pinned to `core` when given) and waits for its `listen=` line.
    pub fn spawn(mut command: Command, core: Option<usize>) -> anyhow::Result<Self> {
        if let Some(core) = core {
            let program = command.get_program().to_owned();
            let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
            let envs: Vec<_> = command
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
                .collect();
            command = Command::new("taskset");
            command
                .arg("-c")
                .arg(core.to_string())
                .arg(program)
                .args(args)
                .envs(envs);
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn,chargegate=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(addr) = line.split("listen=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                    sent = true;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow::anyhow!("the server did not report its address"))?;
        Ok(Self {
            child,
            url: format!("http://{addr}"),
            pid,
            _log: log,
        })
    }

    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid)
    }

    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid)
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Pins this process (all its threads, including those created later) to `core`.
pub fn pin_self(core: usize) {
    let _ = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &core.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status();
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Median latency of a 4 KiB write + fdatasync in `dir`, in microseconds.
pub fn fsync_p50_us(dir: &Path, samples: usize) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut hist = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        hist.record(t.elapsed().as_micros() as u64)?;
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(hist.value_at_quantile(0.5) as f64)
}

/// What the machine is, for the JSON report.
pub fn machine(data_dir: &Path) -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    // The mount's own type: `stat -f` names ext4 "ext2/ext3" (the three share a magic number).
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .arg(data_dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let fs = output("findmnt", &["-n", "-o", "FSTYPE", "--target"])
        .or_else(|| output("stat", &["-f", "-c", "%T"]))
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    serde_json::json!({
        "cores": cores(),
        "cpu": cpu,
        "kernel": kernel,
        "data_dir_filesystem": fs,
        "tonic": locked_version("tonic"),
        "hyper": locked_version("hyper"),
        "tokio": locked_version("tokio"),
        "rusqlite": locked_version("rusqlite"),
    })
}

/// A package's version from the Cargo.lock this bench was built with.
fn locked_version(name: &str) -> String {
    const LOCK: &str = include_str!("../../Cargo.lock");
    let needle = format!("name = \"{name}\"\nversion = \"");
    LOCK.split("[[package]]")
        .find_map(|block| {
            block
                .trim_start()
                .strip_prefix(&needle[..])
                .map(|rest| rest.split('"').next().unwrap_or("").to_owned())
        })
        .unwrap_or_default()
}

/// The release `chargegate` binary next to this bench binary.
pub fn default_server_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("chargegate")
}
