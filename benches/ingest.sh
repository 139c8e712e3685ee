#!/usr/bin/env bash
# End-to-end ingest benchmark (not a test): oha and wrk against a release build with the
# write-ahead log on (fsync grouped), next to the bare-poem ceiling measured in the same run.
# Saturation of single events is measured with both tools: wrk costs far less CPU per request
# than oha, and on two shared cores what the load tool burns is taken from the service. The
# fixed-rate cases use oha only (wrk has no fixed rate, and oha corrects for coordinated
# omission).
#
#   benches/ingest.sh            # full run (~4 minutes)
#   DURATION=5s benches/ingest.sh
#   ENGINE_NICE=19 benches/ingest.sh   # the local ClickHouse at the lowest CPU priority
#   CONNS=64 benches/ingest.sh         # fewer connections (default 128)
#   APP_BIN=path/to/adtrack benches/ingest.sh   # another build of the service (A/B runs)
#
# The local ClickHouse runs on the same two cores; its inserts compete with the service for
# CPU. ENGINE_NICE models the usual deployment (ClickHouse on other machines, or given lower
# priority than the latency-critical ingest path): the engine does the same work, but yields.
#
# Prints a Markdown table (copy it into BENCHMARKS.md) and keeps the raw oha JSON under
# target/bench-ingest/.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
ENGINE_NICE=${ENGINE_NICE:-0}
# Connections of the load tool. Each request waits for its group's fsync, so with 64 the two
# cores were ~18 % idle at saturation (measured with wrk: 45k req/s, 82 % busy); with 128,
# 56k req/s (88 % busy; 256 gave no more). Bare poem is measured with the same number.
CONNS=${CONNS:-128}
OUT=target/bench-ingest
mkdir -p "$OUT"
# shellcheck source=benches/common.sh
. benches/common.sh

cargo build --release --bin adtrack --example bare_poem 2>&1 | tail -1



# Bodies: one event, and a batch of 100 (distinct ids inside the batch).
now=$(date -u +%Y-%m-%dT%H:%M:%S.000Z)
python3 - "$now" "$tmp" <<'PY'
import json, sys, uuid
now, tmp = sys.argv[1], sys.argv[2]
def ev():
    return {"event_id": str(uuid.uuid4()), "event_type": "impression", "timestamp": now,
            "campaign_id": "spring-sale-2026", "ad_id": "ad-000123", "publisher_id": "news.example",
            "user_id": "u-5f2c9a", "country": "US", "device": "mobile", "os": "Android",
            "browser": "Chrome", "cost_micros": 2500, "attributes": {"placement": "top"}}
open(f"{tmp}/one.json", "w").write(json.dumps(ev()))
open(f"{tmp}/batch.json", "w").write(json.dumps([ev() for _ in range(100)]))
open(f"{tmp}/big.json", "w").write(json.dumps([ev() for _ in range(10000)]))
PY
echo "single event body: $(wc -c < "$tmp/one.json") bytes; batch body: $(wc -c < "$tmp/batch.json") bytes"

# ClickHouse (local engine) and the two servers.
ch_port=$(free_port)
nice -n "$ENGINE_NICE" scripts/local-clickhouse --port "$ch_port" --data-dir "$tmp/ch" --parent-pid $$ 2>"$tmp/ch.log" &
pids+=($!)
wait_http "http://127.0.0.1:$ch_port/ping"

bare_port=$(free_port)
target/release/examples/bare_poem "127.0.0.1:$bare_port" &
bare_pid=$!
pids+=($bare_pid)
app_port=$(free_port)
ADTRACK_LISTEN="127.0.0.1:$app_port" ADTRACK_CLICKHOUSE_URL="http://127.0.0.1:$ch_port" \
ADTRACK_CLICKHOUSE_DATABASE=bench ADTRACK_WAL_DIR="$tmp/wal" ADTRACK_DEAD_LETTER_DIR="$tmp/dl" \
LOG_LEVEL=warn "${APP_BIN:-target/release/adtrack}" &
app_pid=$!
pids+=($app_pid)
wait_http "http://127.0.0.1:$app_port/health/ready"
key=$(bench_key "http://127.0.0.1:$app_port" bench)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$bare_port") 2>/dev/null && break; sleep 0.1; done

# Peak RSS of the service (MB): over the whole run, or since the last rss_reset (each case).
rss_peak() { grep VmHWM "/proc/$app_pid/status" | awk '{print int($2/1024)}'; }
rss_reset() { echo 5 > "/proc/$app_pid/clear_refs" 2>/dev/null || true; }

# CPU time (user + system, in clock ticks of 10 ms) a process has used so far: per-request
# CPU is robust to other load on the machine, unlike throughput.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Waits until the service has sent its whole backlog to ClickHouse and has summarized the
# days that changed (a FINAL read of the whole day, once it has been quiet for a refresh
# interval), so one case's background work (the local engine on the same two cores) does
# not weigh on the next case.
drained() {
    for _ in $(seq 1 600); do
        metrics=$(curl -fsS "http://127.0.0.1:$app_port/metrics")
        pending=$(awk '/^adtrack_wal_pending_bytes/ {print $2}' <<< "$metrics")
        stale=$(awk '/^adtrack_rollup_stale_partitions/ {print $2}' <<< "$metrics")
        [ "${pending:-1}" = "0" ] && [ "${stale:-1}" = "0" ] && return 0
        sleep 0.5
    done
    echo "backlog not drained: $pending bytes, $stale days not summarized" >&2
}

# The service's own latency histogram of accepted ingest requests (from when the request
# reaches its handler stack to the response), to tell its tail from the load tool's and the
# kernel's on the shared cores.
server_histogram() {
    curl -fsS "http://127.0.0.1:$app_port/metrics" |
        grep -E '^adtrack_request_seconds_bucket\{route="/v1/events",method="POST",status="202"' || true
}
# p99 bound (ms) of the requests counted between two histogram snapshots ($1, $2 files).
server_p99() {
    python3 - "$1" "$2" <<'PY'
import sys
def read(path):
    out = {}
    for line in open(path):
        name, value = line.rsplit(" ", 1)
        le = name.split('le="')[1].split('"')[0]
        out[float("inf") if le == "+Inf" else float(le)] = float(value)
    return out
before, after = read(sys.argv[1]), read(sys.argv[2])
diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
total = diff[-1][1] if diff else 0
bound = next((le for le, c in diff if total and c >= 0.99 * total), None)
print("-" if bound is None else f"<={bound * 1000:g}")
PY
}

run() { # name server-pid url body extra-args...  (BUSY=1: do not wait for a quiet machine)
    local name=$1 pid=$2 url=$3 body=$4; shift 4
    [ "${BUSY:-0}" = 1 ] || drained
    rss_reset
    local before; before=$(cpu_ticks "$pid")
    server_histogram > "$tmp/hist-before"
    oha --no-tui --output-format json -m POST -H 'content-type: application/json' -H "authorization: Bearer $key" -D "$body" "$@" "$url" > "$OUT/$name.json"
    local used=$(( $(cpu_ticks "$pid") - before ))
    server_histogram > "$tmp/hist-after"
    local server; server=$(if [ "$pid" = "$app_pid" ]; then server_p99 "$tmp/hist-before" "$tmp/hist-after"; else echo -; fi)
    local rss; rss=$(if [ "$pid" = "$app_pid" ]; then rss_peak; else echo -; fi)
    jq -r --arg n "$name" --argjson ticks "$used" --arg server "$server" --arg rss "$rss" '[$n, (.summary.requestsPerSec|floor), (.latencyPercentiles.p50*1000*100|floor/100), (.latencyPercentiles.p99*1000*100|floor/100), $server, ($ticks * 10000 / ([.statusCodeDistribution[]]|add) | floor), $rss, (.statusCodeDistribution|tostring)] | @tsv' "$OUT/$name.json"
}

# The same saturation with wrk (one thread): same table columns. With UNIQUE=1 every request
# gets event ids of its own (the first 8 hex digits of each id are a per-request counter), as
# real traffic has: the oha cases re-send one body, whose ids ClickHouse collapses at insert,
# which makes its work lighter than with new events.
run_wrk() { # name server-pid url body [conns]
    local name=$1 pid=$2 url=$3 body=$4 conns=${5:-$CONNS}
    drained
    rss_reset
    local before; before=$(cpu_ticks "$pid")
    server_histogram > "$tmp/hist-before"
    cat > "$tmp/post.lua" <<LUA
wrk.method = "POST"
local f = io.open("$body"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
if "${UNIQUE:-0}" == "1" then
  local pieces, at = {}, 1
  for _, e in function() return wrk.body:find('"event_id": "', at, true) end do
    pieces[#pieces + 1] = wrk.body:sub(at, e); at = e + 9
  end
  pieces[#pieces + 1] = wrk.body:sub(at)
  if #pieces == 1 then error("no event_id in $body") end
  local n, parts = 0, {}
  request = function()
    n = n + 1
    local prefix = string.format("%08x", n)
    for i = 1, #pieces - 1 do parts[2 * i - 1] = pieces[i]; parts[2 * i] = prefix end
    parts[2 * #pieces - 1] = pieces[#pieces]
    return wrk.format(nil, nil, nil, table.concat(parts, "", 1, 2 * #pieces - 1))
  end
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %f %.2f %.2f %d\\n", summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
    wrk -t1 -c "$conns" -d "$DURATION" -s "$tmp/post.lua" "$url" > "$OUT/$name.txt"
    local used=$(( $(cpu_ticks "$pid") - before ))
    server_histogram > "$tmp/hist-after"
    local server; server=$(if [ "$pid" = "$app_pid" ]; then server_p99 "$tmp/hist-before" "$tmp/hist-after"; else echo -; fi)
    read -r _ requests rate p50 p99 errors < <(grep '^RESULT' "$OUT/$name.txt")
    local rss; rss=$(if [ "$pid" = "$app_pid" ]; then rss_peak; else echo -; fi)
    echo -e "$name\t${rate%.*}\t$p50\t$p99\t$server\t$(( used * 10000 / requests ))\t$rss\t{\"non-2xx or errors\":$errors}"
}

echo -e "case\treq/s\tp50 ms\tp99 ms\tservice p99 ms\tserver CPU us/req\tpeak RSS MB\tstatuses"
bare="http://127.0.0.1:$bare_port/v1/events"
app="http://127.0.0.1:$app_port/v1/events"
run bare-single         "$bare_pid" "$bare" "$tmp/one.json"   -z "$DURATION" -c "$CONNS"
run app-single          "$app_pid"  "$app"  "$tmp/one.json"   -z "$DURATION" -c "$CONNS"
run_wrk bare-single-wrk "$bare_pid" "$bare" "$tmp/one.json"
run_wrk app-single-wrk  "$app_pid"  "$app"  "$tmp/one.json"
run bare-batch100       "$bare_pid" "$bare" "$tmp/batch.json" -z "$DURATION" -c 16
run app-batch100        "$app_pid"  "$app"  "$tmp/batch.json" -z "$DURATION" -c 16
run app-single-20k-rate "$app_pid"  "$app"  "$tmp/one.json"   -z "$DURATION" -c "$CONNS" -q 20000 --latency-correction
run app-single-10k-rate "$app_pid"  "$app"  "$tmp/one.json"   -z "$DURATION" -c "$CONNS" -q 10000 --latency-correction
# Small requests beside large ones: 5,000 single events/s while wrk posts 10,000-event
# batches (3.7 MB) over 2 connections without pause. What it shows: a large body does not
# hold up the other connections of its request thread (it is parsed off that thread).
cat > "$tmp/big.lua" <<LUA
wrk.method = "POST"
local f = io.open("$tmp/big.json"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
drained
# (DURATION in seconds, e.g. 10s: wrk runs 2 s longer than oha.)
wrk -t1 -c2 -d "$(( ${DURATION%s} + 2 ))s" -s "$tmp/big.lua" "$app" > "$OUT/big-batches-beside.txt" &
big_wrk=$!
sleep 1
BUSY=1 run app-single-5k-beside-big-batches "$app_pid" "$app" "$tmp/one.json" -z "$DURATION" -c "$CONNS" -q 5000 --latency-correction
wait "$big_wrk"
echo "(10,000-event batches alongside: $(awk '/Requests\/sec/ {print $2}' "$OUT/big-batches-beside.txt") req/s, $(awk '/Non-2xx/ {n = $NF} END {print n + 0}' "$OUT/big-batches-beside.txt") non-2xx; this case's service p99, CPU and RSS include them)"
UNIQUE=1 run_wrk app-single-wrk-unique   "$app_pid" "$app" "$tmp/one.json"
UNIQUE=1 run_wrk app-batch100-wrk-unique "$app_pid" "$app" "$tmp/batch.json" 16
# How fast the backlog the last case left goes into ClickHouse (the shipper alone, on a quiet
# machine): the rate the service can sustain with new events on this machine.
metric() { curl -fsS "http://127.0.0.1:$app_port/metrics" | awk -v n="$1" '$1 == n {print $2}'; }
backlog=$(metric adtrack_wal_pending_bytes); flushed=$(metric adtrack_flushed_rows_total); started=$(date +%s.%N)
for _ in $(seq 1 6000); do [ "$(metric adtrack_wal_pending_bytes)" = "0" ] && break; sleep 0.1; done
python3 - "$backlog" "$flushed" "$(metric adtrack_flushed_rows_total)" "$started" "$(date +%s.%N)" <<'PY'
import sys
backlog, before, after, start, end = map(float, sys.argv[1:])
print(f"backlog after the unique batches: {backlog / 1e6:,.0f} MB, in ClickHouse after {end - start:.1f} s "
      f"({(after - before) / max(end - start, 1e-9):,.0f} rows/s)")
PY
rps() { jq -r '.summary.requestsPerSec' "$OUT/$1.json"; }
wrk_rps() { awk '/^RESULT/ {print $3}' "$OUT/$1.txt"; }
python3 - "$(rps app-single)" "$(rps bare-single)" "$(rps app-batch100)" "$(rps bare-batch100)" \
    "$(wrk_rps app-single-wrk)" "$(wrk_rps bare-single-wrk)" \
    "$(wrk_rps app-single-wrk-unique)" "$(wrk_rps app-batch100-wrk-unique)" <<'PY'
import sys
a1, b1, a100, b100, w1, wb1, u1, u100 = map(float, sys.argv[1:])
print(f"single event (oha): {a1:,.0f} req/s = {a1 / b1:.0%} of bare poem ({b1:,.0f})")
print(f"single event (wrk): {w1:,.0f} req/s = {w1 / wb1:.0%} of bare poem ({wb1:,.0f})")
print(f"100-event batches: {a100 * 100:,.0f} events/s = {a100 / b100:.0%} of bare poem's request rate ({b100:,.0f} req/s)")
print(f"new event ids in every request (wrk): single event {u1:,.0f} req/s, 100-event batches {u100 * 100:,.0f} events/s")
PY

metrics=$(curl -fsS "http://127.0.0.1:$app_port/metrics")
echo "$metrics" | grep -E '^adtrack_wal_fsync_seconds_(bucket|count|sum)' > "$OUT/fsync.txt"
python3 - "$OUT/fsync.txt" <<'PY'
import sys
buckets, count = [], 0
for line in open(sys.argv[1]):
    name, value = line.rsplit(" ", 1)
    if "_bucket" in name:
        le = name.split('le="')[1].rstrip('"}')
        buckets.append((float("inf") if le == "+Inf" else float(le), float(value)))
    elif name.endswith("_count"):
        count = float(value)
def pct(p):
    for le, c in buckets:
        if c >= p * count:
            return le * 1000
print(f"fsyncs: {int(count)}; p50 <= {pct(0.5)} ms, p99 <= {pct(0.99)} ms (histogram bucket bounds)")
PY
accepted=$(echo "$metrics" | awk '/^adtrack_events_accepted_total/ {print $2}')
echo "events accepted (durable) during the run: $accepted"
