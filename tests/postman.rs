//! The Postman collection (`_test/postman/`): run with newman against the live service, and
//! kept in step with `/openapi.json` so it cannot drift.
//!
//! newman comes from the project-local `_test/postman/node_modules` (pinned in
//! `package-lock.json`); it is installed with `npm ci` on first use. Node.js and npm must be
//! installed: without them these tests fail and say so.

#[path = "api/helpers.rs"]
mod helpers;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
};

use helpers::*;
use serde_json::Value;

const COLLECTION: &str = "adtrack.postman_collection.json";

fn postman_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("_test")
        .join("postman")
}

fn run(cmd: &mut Command, what: &str, missing: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}). {missing}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `node_modules/.bin/newman`, installed with `npm ci` if it is not there yet.
fn newman() -> PathBuf {
    const NEED_NODE: &str = "The Postman collection runs with newman on Node.js: install node \
        and npm (e.g. `apt-get install nodejs npm`), then `npm ci --prefix _test/postman`.";
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap();
    let dir = postman_dir();
    let bin = dir.join("node_modules").join(".bin").join("newman");
    let node = run(Command::new("node").arg("--version"), "node", NEED_NODE);
    assert!(node.status.success(), "node does not run. {NEED_NODE}");
    if !bin.exists() {
        let out = run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--prefix"])
                .arg(&dir),
            "npm",
            NEED_NODE,
        );
        assert!(
            out.status.success(),
            "npm ci --prefix _test/postman failed:\n{}",
            text(&out)
        );
    }
    assert!(bin.exists(), "npm ci did not install newman");
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postman_collection_passes_against_the_live_service() {
    let newman = newman();
    let tmp = tempfile::tempdir().unwrap();
    let env = base_env(
        &local_clickhouse::shared_url(),
        &unique_database("postman"),
        tmp.path(),
    );
    let service = ServiceProcess::start(&env).await;
    let key = provision_key(&service.base, TENANT).await;
    let out = tokio::task::spawn_blocking(move || {
        run(
            Command::new(newman)
                .arg("run")
                .arg(postman_dir().join(COLLECTION))
                .args(["--env-var", &format!("baseUrl={}", service.base)])
                .args(["--env-var", &format!("apiKey={key}")])
                .args(["--env-var", &format!("adminKey={ADMIN_KEY}")])
                .args(["--env-var", &format!("tenantId={TENANT}")])
                .args(["--reporters", "cli", "--color", "off", "--disable-unicode"])
                .args(["--timeout-request", "30000"]),
            "newman",
            "",
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "newman run failed:\n{}", text(&out));
}

/// The collection without what may change freely (descriptions): what requests it makes and
/// what it checks.
fn normalized(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// `FOLDER / NAME: METHOD URL` of every request.
fn requests(collection: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for folder in collection["item"].as_array().into_iter().flatten() {
        for item in folder["item"].as_array().into_iter().flatten() {
            out.push(format!(
                "{} / {}: {} {}",
                folder["name"].as_str().unwrap_or(""),
                item["name"].as_str().unwrap_or(""),
                item["request"]["method"].as_str().unwrap_or(""),
                item["request"]["url"]["raw"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

#[tokio::test]
async fn the_committed_collection_is_generated_from_the_current_openapi_document() {
    let app = spawn_app("postman_spec").await;
    let spec = app.get("/openapi.json").await;
    assert_eq!(spec.status, 200);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("openapi.json"), &spec.text).unwrap();
    let fresh_path = tmp.path().join(COLLECTION);
    let out = run(
        Command::new("python3")
            .arg(postman_dir().join("generate.py"))
            .arg("--spec")
            .arg(tmp.path().join("openapi.json"))
            .arg("--out")
            .arg(&fresh_path),
        "python3",
        "Python 3 is needed to generate the Postman collection.",
    );
    assert!(out.status.success(), "generate.py failed:\n{}", text(&out));

    let committed_path = postman_dir().join(COLLECTION);
    let fresh_text = std::fs::read_to_string(&fresh_path).unwrap();
    let fresh: Value = serde_json::from_str(&fresh_text).unwrap();
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&committed_path).unwrap_or_else(|_| "null".into()),
    )
    .unwrap_or(Value::Null);
    if normalized(fresh.clone()) == normalized(committed.clone()) {
        return;
    }
    if std::env::var("UPDATE_POSTMAN").is_ok_and(|v| v == "1") {
        std::fs::write(&committed_path, fresh_text).unwrap();
        return;
    }
    let (new, old) = (requests(&fresh), requests(&committed));
    let added: Vec<&String> = new.iter().filter(|r| !old.contains(r)).collect();
    let removed: Vec<&String> = old.iter().filter(|r| !new.contains(r)).collect();
    panic!(
        "_test/postman/{COLLECTION} is out of date with /openapi.json.\n\
         requests to add: {added:#?}\nrequests to remove: {removed:#?}\n\
         (or the checks of a request changed). Regenerate it with\n  \
         UPDATE_POSTMAN=1 cargo test --test postman\n\
         or `python3 _test/postman/generate.py --url <running service>`, and commit it."
    );
}
