# Shared by the benchmark scripts (sourced, not run): load tools, free ports, a temporary
# directory, and cleanup of every process a script starts (append its pid to `pids`).

command -v oha >/dev/null || { echo "installing oha (cargo install oha --locked, ~8 min)"; cargo install oha --locked; }
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null; }
command -v jq >/dev/null || { apt-get install -y -qq jq >/dev/null; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 600); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no answer from $1"; exit 1; }

# The bootstrap admin key of the service a script starts, and a key without rate limits.
export ADTRACK_ADMIN_KEY=${ADTRACK_ADMIN_KEY:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
bench_key() { ADTRACK_URL="$1" scripts/dev-key --unlimited "$2"; } # base-url tenant
