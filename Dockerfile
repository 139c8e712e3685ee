# syntax=docker/dockerfile:1
#
# adtrack container image.
#
#   docker build -t adtrack .                   # the runtime image (last stage, the default)
#   docker build --target dev -t adtrack-dev .  # toolchain + cargo-watch (docker-compose.dev.yml)
#
# The builder's Debian release (bookworm) matches the runtime's, so the binary links against
# the glibc it runs with. The Rust version must be at least the newest `rust-version` among
# the locked dependencies (1.89 today); it is pinned so builds are reproducible.

# ---------------------------------------------------------------------------------------------
# dev: the source is mounted at /app and rebuilt and restarted on every change.
FROM rust:1.95-bookworm AS dev
RUN cargo install cargo-watch --locked --version 8.5.3 \
    && rm -rf /usr/local/cargo/registry
WORKDIR /app
ENV ADTRACK_LISTEN=0.0.0.0:8080 \
    ADTRACK_CLICKHOUSE_URL=http://clickhouse:8123 \
    ADTRACK_WAL_DIR=/var/lib/adtrack/wal \
    ADTRACK_DEAD_LETTER_DIR=/var/lib/adtrack/dead-letter \
    CARGO_TARGET_DIR=/app/target
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["cargo", "watch", "--why", "-w", "src", "-w", "clickhouse-init", "-w", "Cargo.toml", "-w", "Cargo.lock", "-x", "run --locked --bin adtrack"]

# ---------------------------------------------------------------------------------------------
# builder: dependencies first, in a layer of their own that only Cargo.toml / Cargo.lock
# changes invalidate; then the sources.
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# The workspace's manifests, with empty targets, are enough to build every dependency.
COPY Cargo.toml Cargo.lock ./
COPY _test/loader/Cargo.toml _test/loader/Cargo.toml
RUN mkdir -p src _test/loader/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > _test/loader/src/main.rs \
    && touch _test/loader/src/lib.rs \
    && cargo build --release --locked -p adtrack --bin adtrack \
    && rm -rf src _test/loader/src

COPY . .
# The placeholder build left adtrack's own artifacts behind, possibly newer than the copied
# sources: drop them so cargo rebuilds the crate (dependencies stay built).
RUN rm -rf target/release/.fingerprint/adtrack-* \
        target/release/deps/adtrack-* target/release/deps/libadtrack-* \
    && cargo build --release --locked -p adtrack --bin adtrack \
    && install -D -m 0755 target/release/adtrack /out/adtrack

# ---------------------------------------------------------------------------------------------
# runtime: the binary, ca-certificates, and curl for the healthcheck.
FROM debian:bookworm-slim AS runtime

# Versions are not pinned: Debian's security updates replace them within the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged uid/gid (10001) that owns the data directory, so a named volume
# mounted there starts out writable by it.
RUN groupadd --system --gid 10001 adtrack \
    && useradd --system --uid 10001 --gid adtrack --home-dir /var/lib/adtrack \
        --no-create-home --shell /usr/sbin/nologin adtrack \
    && install -d -o adtrack -g adtrack -m 0750 \
        /var/lib/adtrack /var/lib/adtrack/wal /var/lib/adtrack/dead-letter

COPY --from=builder /out/adtrack /usr/local/bin/adtrack

LABEL org.opencontainers.image.title="adtrack" \
      org.opencontainers.image.description="Ad-event ingestion and analytics service over ClickHouse" \
      org.opencontainers.image.licenses="MIT"

# Container defaults. ADTRACK_CLICKHOUSE_URL is always set here: without it the service
# would try to start the development engine, which is not in this image. The schema SQL is
# compiled into the binary.
ENV ADTRACK_LISTEN=0.0.0.0:8080 \
    ADTRACK_CLICKHOUSE_URL=http://clickhouse:8123 \
    ADTRACK_WAL_DIR=/var/lib/adtrack/wal \
    ADTRACK_DEAD_LETTER_DIR=/var/lib/adtrack/dead-letter \
    ADTRACK_LOG_FORMAT=json \
    LOG_LEVEL=info

# The write-ahead log and the dead letters. One volume per running instance, never shared
# by two: each instance's log is its own sequence of segments and checkpoint.
VOLUME ["/var/lib/adtrack"]
WORKDIR /var/lib/adtrack
USER 10001:10001
EXPOSE 8080

# SIGTERM starts the graceful shutdown: stop accepting, finish requests (up to 10 s), drain
# the log into ClickHouse (ADTRACK_SHUTDOWN_TIMEOUT_SECS, 30 s). Give the container more than
# 40 s to stop (compose: stop_grace_period); whatever is not drained stays in the log volume
# and is sent after the next start.
STOPSIGNAL SIGTERM

# Ready = ClickHouse answers, the schema is right, the log is writable (the port is the one
# of ADTRACK_LISTEN).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health/ready"]

ENTRYPOINT ["/usr/local/bin/adtrack"]
