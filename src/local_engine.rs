//! Starts the project's local ClickHouse (`scripts/local-clickhouse`, chdb-core behind
//! ClickHouse's HTTP protocol) when no `ADTRACK_CLICKHOUSE_URL` is configured.
//!
//! The engine is told our pid (`--parent-pid`) and exits by itself when we are gone, so a
//! crashed or killed service never leaves an engine holding the data directory.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};

pub struct LocalEngine {
    child: Option<Child>,
}

impl LocalEngine {
    pub async fn start(command: &Path, data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        if ping(port).await {
            tracing::info!(
                port,
                "a local ClickHouse already answers on this port; using it"
            );
            return Ok(Self { child: None });
        }
        let command = resolve(command);
        tracing::info!(command = %command.display(), port, data_dir = %data_dir.display(),
            "starting the local ClickHouse (the first start installs it; this can take a minute)");
        let mut child = Command::new(&command)
            .arg("--port")
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", command.display()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            if ping(port).await {
                return Ok(Self { child: Some(child) });
            }
            if let Some(status) = child.try_wait()? {
                bail!("the local ClickHouse exited during start-up ({status})");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the local ClickHouse did not answer on port {port} within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks the engine to stop (SIGTERM) and waits for it, so its data is flushed cleanly.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// A relative command is looked up from the working directory, then beside the executable's
/// project (so `cargo run` from a sub-directory still finds `scripts/`).
fn resolve(command: &Path) -> PathBuf {
    if command.is_absolute() || command.exists() {
        return command.to_path_buf();
    }
    let from_manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join(command);
    if from_manifest.exists() {
        from_manifest
    } else {
        command.to_path_buf()
    }
}

/// True when `GET /ping` on the port answers `Ok.`.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<bool, std::io::Error>(String::from_utf8_lossy(&reply).contains("Ok."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}
