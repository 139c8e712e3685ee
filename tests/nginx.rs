//! nginx in front of two service instances on loopback, as in production
//! (`nginx/nginx.test.conf.template`: least connections, keepalive to the upstreams, failed
//! upstreams retried for POST too). Sustained ingest through nginx while one instance is killed
//! with SIGKILL and restarted: every answer a client gets is a 202 (nginx retried what failed
//! on the other instance), ClickHouse holds every acknowledged event exactly once, and nginx
//! sends traffic to the restarted instance again. And an export the service cuts off midway
//! reaches the client cut off too, not as a complete answer.
//!
//! Needs Debian's `nginx` (`scripts/install-deps` installs it); it runs as a child process with
//! everything under a temporary prefix.

#[path = "api/helpers.rs"]
mod helpers;

use std::{
    fs,
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use helpers::*;
use serde_json::Value;

/// The production proxy settings, with placeholders for ports and the prefix.
const TEMPLATE: &str = "nginx/nginx.test.conf.template";

fn nginx_binary() -> PathBuf {
    for candidate in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    let found = Command::new("sh")
        .args(["-c", "command -v nginx"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match found {
        Some(path) if !path.is_empty() => path.into(),
        _ => panic!(
            "nginx is not installed: run scripts/install-deps (or apt-get install nginx-light)"
        ),
    }
}

/// nginx as a child process; stopped (SIGQUIT, then SIGKILL) when dropped.
struct Nginx {
    child: Child,
    prefix: PathBuf,
    base: String,
}

impl Nginx {
    fn start(prefix: &Path, upstream_ports: [u16; 2]) -> Nginx {
        let port = free_port();
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join(TEMPLATE);
        let template =
            fs::read_to_string(&template).unwrap_or_else(|e| panic!("{}: {e}", template.display()));
        let conf = template
            .replace("@LISTEN_PORT@", &port.to_string())
            .replace("@UPSTREAM_PORT_1@", &upstream_ports[0].to_string())
            .replace("@UPSTREAM_PORT_2@", &upstream_ports[1].to_string())
            .replace("@PREFIX@", &prefix.display().to_string());
        let unreplaced: Vec<&str> = conf
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter(|l| {
                l.split('@').skip(1).step_by(2).any(|name| {
                    !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                })
            })
            .collect();
        assert!(
            unreplaced.is_empty(),
            "{TEMPLATE} has placeholders this test does not know: {unreplaced:?}"
        );
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let stderr = fs::File::create(prefix.join("nginx.stderr")).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx {
            child,
            prefix: prefix.to_path_buf(),
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen:\n{}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    /// nginx's own messages (stderr).
    fn log(&self) -> String {
        fs::read_to_string(self.prefix.join("nginx.stderr")).unwrap_or_default()
    }

    /// The JSON access log, one object per request (every line must be JSON).
    fn access_log(&self) -> Vec<Value> {
        fs::read_to_string(self.prefix.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Whether a request after the first `skip` lines of the access log was answered 202 by
    /// the upstream `addr` (on its first try).
    fn served_by(&self, addr: &str, skip: usize) -> bool {
        fs::read_to_string(self.prefix.join("access.log"))
            .unwrap_or_default()
            .lines()
            .skip(skip)
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["upstream_addr"] == addr && l["upstream_status"] == "202")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop, workers included (a SIGKILL would orphan them).
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_behind_nginx_costs_clients_nothing_and_clickhouse_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // nginx's workers may run as an unprivileged user: they need to reach the prefix.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let url = local_clickhouse::shared_url();
    let database = unique_database("nginx");
    let db = clickhouse::Client::default()
        .with_url(&url)
        .with_database(&database);
    // One database, a write-ahead log each.
    let envs: Vec<_> = (0..2)
        .map(|i| base_env(&url, &database, &tmp.path().join(format!("instance-{i}"))))
        .collect();
    let ports = [free_port(), free_port()];
    let mut first = ServiceProcess::start_on(&envs[0], ports[0]).await;
    let second = ServiceProcess::start_on(&envs[1], ports[1]).await;
    let nginx_prefix = tmp.path().join("nginx");
    fs::create_dir_all(&nginx_prefix).unwrap();
    let nginx = Nginx::start(&nginx_prefix, ports);

    // X-Request-Id: nginx keeps a plain one from the client, or makes one; either way the
    // client gets it back and the JSON access log has it.
    let http = reqwest::Client::new();
    let mine = http
        .get(format!("{}/health/live", nginx.base))
        .header("x-request-id", "nginx-test-42")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), 200);
    assert_eq!(mine.headers()["x-request-id"], "nginx-test-42");
    let generated = http
        .get(format!("{}/health/live", nginx.base))
        .send()
        .await
        .unwrap();
    let generated_id = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(generated_id.len() >= 16, "{generated_id:?}");

    // A browser's preflight passes through to an instance, which answers it (no key needed).
    let preflight = preflight(&nginx.base, "/v1/events", "https://shop.example", "POST").await;
    assert_eq!(preflight.status, 204, "{}", preflight.text);
    let allowed: Vec<_> = preflight
        .headers
        .get_all("access-control-allow-origin")
        .iter()
        .collect();
    assert_eq!(allowed, ["*"]);

    let key = provision_key(&nginx.base, TENANT).await;
    let load = Load::start(&nginx.base, &key, 4, Duration::from_millis(3));
    let started = Instant::now();
    wait_until("load through nginx", Duration::from_secs(10), || {
        load.acked() >= 2000
    })
    .await;
    let before_kill = load.acked();
    first.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let while_down = load.acked() - before_kill;
    let log_before_restart = nginx.access_log().len();
    first = ServiceProcess::start_on(&envs[0], ports[0]).await;
    // nginx tries the instance again once its `fail_timeout` (10 s) is over.
    let restarted = format!("127.0.0.1:{}", ports[0]);
    wait_until(
        "nginx sends requests to the restarted instance",
        Duration::from_secs(20),
        || nginx.served_by(&restarted, log_before_restart),
    )
    .await;
    let (acked, statuses) = load.finish().await;
    let load_time = started.elapsed();

    assert_eq!(
        statuses.keys().collect::<Vec<_>>(),
        vec![&202],
        "clients saw only 202s: {statuses:?}\nnginx:\n{}",
        nginx.log()
    );
    assert!(
        while_down > 500,
        "ingest went on while an instance was down: {while_down}"
    );
    let stored = assert_all_stored_once(&db, &acked).await;
    assert_eq!(stored, acked.len(), "events nobody acknowledged");

    // The access log: JSON with the request id; both instances served; some requests were
    // retried on the other instance (two upstream attempts in one line).
    let log = nginx.access_log();
    assert!(
        log.len() >= statuses.values().sum::<usize>(),
        "a line per request"
    );
    assert!(log.iter().all(|l| l["request_id"].is_string()));
    let ids: Vec<&str> = log
        .iter()
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    assert!(ids.contains(&"nginx-test-42") && ids.contains(&generated_id.as_str()));
    for port in ports {
        let addr = format!("127.0.0.1:{port}");
        assert!(
            log.iter().any(|l| l["upstream_addr"]
                .as_str()
                .is_some_and(|a| a.contains(&addr))),
            "no request reached {addr}"
        );
    }
    let retried = log
        .iter()
        .filter(|l| {
            l["upstream_addr"]
                .as_str()
                .is_some_and(|a| a.contains(", "))
        })
        .count();
    assert!(retried > 0, "no request was retried on the other instance");
    eprintln!(
        "nginx: {} events acknowledged in {load_time:?} ({while_down} while an instance was down), \
         {retried} requests retried by nginx, statuses {statuses:?}",
        acked.len()
    );
    if std::env::var("TEST_LOG").is_ok() {
        eprintln!("{}", nginx.log());
    }
    drop(nginx);
    first.terminate();
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_the_service_cuts_off_reaches_the_client_cut_off_through_nginx() {
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (app, _) = app_whose_export_stalls("nginx_export").await;
    let port: u16 = app.base.rsplit(':').next().unwrap().parse().unwrap();
    let nginx_prefix = tmp.path().join("nginx");
    fs::create_dir_all(&nginx_prefix).unwrap();
    let nginx = Nginx::start(&nginx_prefix, [port, port]);

    let (received, end) = export_as_far_as_it_comes(&app.http, &nginx.base).await;
    assert!(!received.is_empty());
    assert!(
        end.is_err(),
        "nginx passed the cut-off export on as complete:\n{}",
        nginx.log()
    );
}
