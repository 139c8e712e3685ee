//! A local ClickHouse for integration tests: `scripts/local-clickhouse` (chdb-core behind
//! ClickHouse's HTTP protocol), one process per data directory.
//!
//! Include it from a test crate with
//! `#[path = "support/local_clickhouse.rs"] mod local_clickhouse;` (or from `tests/common/mod.rs`
//! with `#[path = "../support/local_clickhouse.rs"] mod local_clickhouse;`).
//!
//! - [`shared_url`]: the server most tests use. `ADTRACK_TEST_CLICKHOUSE_URL` points the tests at
//!   an external server (e.g. a real clickhouse-server in CI); otherwise one local server is
//!   started per test binary. Tests share it, so each one works in its own database.
//! - [`LocalClickHouse`]: a server of a test's own, for tests that kill and restart it.
//!
//! Every server is started with `--parent-pid <this test process>` and exits by itself once the
//! test process is gone: statics are never dropped, and a killed test run must not leave servers
//! holding ports and data directories.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

/// The first start may create the project's virtualenv (pip install of chdb-core).
const START_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const LOG_FILE: &str = "local-clickhouse.log";

/// One local ClickHouse server process.
pub struct LocalClickHouse {
    /// `http://127.0.0.1:<port>`, for `clickhouse::Client::with_url`.
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    child: Child,
}

impl LocalClickHouse {
    /// Starts a server on a free port over `data_dir` (created if missing) and waits until it
    /// answers `/ping`. Panics with the server's log if it does not come up.
    pub fn start(data_dir: &Path) -> LocalClickHouse {
        // The port is free when we pick it but could be taken before the server binds it:
        // the server then exits at once and we try another one.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(data_dir, free_port()) {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("{last_error}");
    }

    /// Starts a server on a given port (e.g. to come back where a killed one was).
    pub fn start_on(data_dir: &Path, port: u16) -> LocalClickHouse {
        Self::try_start(data_dir, port).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start(data_dir: &Path, port: u16) -> Result<LocalClickHouse, String> {
        fs::create_dir_all(data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", data_dir.display()))?;
        let log_path = data_dir.join(LOG_FILE);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let script = repo_root().join("scripts").join("local-clickhouse");
        let mut child = Command::new(&script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the local ClickHouse on port {port} exited during start-up ({status}):\n{}",
                    log_tail(&log_path)
                ));
            }
            if ping(port) {
                return Ok(LocalClickHouse {
                    url: format!("http://127.0.0.1:{port}"),
                    port,
                    data_dir,
                    child,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the local ClickHouse did not answer on port {port} within {START_TIMEOUT:?}:\n{}",
                    log_tail(&log_path)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM (graceful) and waits; SIGKILL if it takes over 20 s.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // std has no SIGTERM; kill(1) avoids a libc dependency for the tests.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Starts the server again on the same directory and port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Self::start_on(&self.data_dir, self.port);
        // The old handle's process is already gone; its Drop is a no-op.
        *self = fresh;
    }

    /// The server's stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.data_dir.join(LOG_FILE)).unwrap_or_default()
    }
}

impl Drop for LocalClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// URL of the ClickHouse most tests use: `ADTRACK_TEST_CLICKHOUSE_URL` if set, otherwise one
/// local server for this test binary, started on first use.
pub fn shared_url() -> String {
    if let Ok(url) = std::env::var("ADTRACK_TEST_CLICKHOUSE_URL") {
        if !url.trim().is_empty() {
            return url;
        }
    }
    static SHARED: OnceLock<LocalClickHouse> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let root = std::env::temp_dir();
            remove_stale_shared_dirs(&root);
            let dir = root.join(format!("{SHARED_PREFIX}{}", std::process::id()));
            // A directory left by an earlier process that had our pid holds its data: start fresh.
            let _ = fs::remove_dir_all(&dir);
            LocalClickHouse::start(&dir)
        })
        .url
        .clone()
}

const SHARED_PREFIX: &str = "adtrack-test-clickhouse-";

/// Shared servers outlive nothing (see `--parent-pid`) but their directories stay: remove those
/// of test processes that no longer exist.
fn remove_stale_shared_dirs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SHARED_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The project root: the including crate's directory, or the nearest one above it with
/// `scripts/` (for workspace members such as `_test/loader`).
fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("scripts").join("local-clickhouse").exists())
        .map_or(manifest.clone(), Path::to_path_buf)
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free local port")
}

/// `GET /ping` over a plain socket (no HTTP client dependency); true on `200` + `Ok.`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = "GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.ends_with("\r\n\r\nOk.\n")
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
