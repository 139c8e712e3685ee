#!/usr/bin/env bash
# Analytics benchmark (not a test): 10 million events in the local ClickHouse engine, then oha
# with 8 concurrent clients against a release build for
#   summary     30 days, default metrics
#   timeseries  hourly buckets over 7 days, Europe/Berlin
#   breakdown   top 20 campaigns by impressions over 30 days, with the other row
# with the hourly summaries current, once as loaded (many parts per day) and once after
# OPTIMIZE FINAL (one part per day: the state background merges reach for every day but the
# current one); then, for comparison, a service with the summaries off (raw events with FINAL),
# and the summaries service right after two days changed (those days read raw). In both the
# merged and the changed state, 100 random queries (benches/compare_answers.py) must get the
# same answers from the summaries and the raw-only service, or the run fails.
#
#   benches/analytics.sh                 # 10M events, 200 requests per case
#   EVENTS=1000000 REQUESTS=50 benches/analytics.sh
#
# Prints a Markdown table (copy it into BENCHMARKS.md) and keeps the raw oha JSON under
# target/bench-analytics/.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${EVENTS:-10000000}
REQUESTS=${REQUESTS:-200}
CONCURRENCY=${CONCURRENCY:-8}
OUT=target/bench-analytics
mkdir -p "$OUT"
# shellcheck source=benches/common.sh
. benches/common.sh

cargo build --release --bin adtrack 2>&1 | tail -1


ch_port=$(free_port)
scripts/local-clickhouse --port "$ch_port" --data-dir "$tmp/ch" --parent-pid $$ 2>"$tmp/ch.log" &
pids+=($!)
wait_http "http://127.0.0.1:$ch_port/ping"
ch="http://127.0.0.1:$ch_port"

app_port=$(free_port)
ADTRACK_LISTEN="127.0.0.1:$app_port" ADTRACK_CLICKHOUSE_URL="$ch" \
ADTRACK_CLICKHOUSE_DATABASE=bench ADTRACK_WAL_DIR="$tmp/wal" ADTRACK_DEAD_LETTER_DIR="$tmp/dl" \
LOG_LEVEL=warn target/release/adtrack &
app_pid=$!
pids+=($!)
app="http://127.0.0.1:$app_port"
wait_http "$app/health/ready"
key=$(bench_key "$app" default)
auth="authorization: Bearer $key"

sql() { curl -fsS "$ch/?database=bench" --data-binary "$1"; }

# Synthetic traffic over the last 29.9 days: 80% impressions, 15% clicks, 5% conversions;
# 500 campaigns with a skewed (cubic) popularity, 20k ads, 200 publishers, 1M users, 30
# countries. Inserted 1M rows at a time (one part each, as the shipper's batches would be),
# then 1% of the events re-sent an hour later (duplicates FINAL must collapse).
# One base time for every insert, so a re-sent copy has its original's timestamp (and so the
# same sorting key and partition).
base_ms=$(( $(date +%s) * 1000 ))
insert() { # $1 = first number, $2 = count, $3 = seconds added to received_at
    sql "INSERT INTO events (tenant, event_id, event_type, timestamp, event_time, sent_at, received_at,
           campaign_id, ad_id, publisher_id, advertiser_id, user_id, country, device, os, browser,
           cost_micros, revenue_micros, attributes)
         SELECT 'default',
           toUUID(concat(leftPad(hex(cityHash64(n, 7)), 16, '0'), leftPad(hex(cityHash64(n, 8)), 16, '0'))),
           multiIf(r % 100 < 80, 'impression', r % 100 < 95, 'click', 'conversion'),
           ts, ts, NULL, ts + toIntervalSecond(1 + $3),
           concat('camp-', toString(toUInt32(pow((r % 1000003) / 1000003., 3) * 500))),
           concat('ad-', toString(r % 20000)), concat('pub-', toString(r % 200)),
           concat('adv-', toString(r % 40)), concat('u', toString(cityHash64(n, 3) % 1000000)),
           ['US','DE','FR','GB','IN','BR','JP','CA','AU','ES','IT','NL','SE','PL','MX',
            'AR','KR','ZA','NG','EG','TR','ID','TH','VN','PH','NZ','IE','PT','AT','CH'][1 + r % 30],
           ['desktop','mobile','tablet','ctv','other'][1 + bitShiftRight(r, 8) % 5],
           ['iOS','Android','Windows','macOS','Linux'][1 + bitShiftRight(r, 16) % 5],
           ['Chrome','Safari','Firefox','Edge'][1 + bitShiftRight(r, 24) % 4],
           if(r % 100 < 95, r % 200000, 0), if(r % 100 >= 95, r % 50000000, 0),
           map('placement', ['sidebar','header','feed'][1 + bitShiftRight(r, 32) % 3])
         FROM (SELECT number AS n, cityHash64(number) AS r,
                      fromUnixTimestamp64Milli(toInt64($base_ms - 60000 - cityHash64(number, 2) % 2583360000), 'UTC') AS ts
               FROM numbers($1, $2))"
}
echo "loading $EVENTS events"
start=$(date +%s)
chunk=1000000
for ((first = 0; first < EVENTS; first += chunk)); do
    insert "$first" "$(( EVENTS - first < chunk ? EVENTS - first : chunk ))" 0
done
insert 0 $(( EVENTS / 100 )) 3600
echo "loaded in $(( $(date +%s) - start )) s: $(sql 'SELECT count() FROM events') rows, $(sql 'SELECT count() FROM events FINAL') distinct"

iso() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
now=$(date +%s)
d30="from=$(iso $((now - 30 * 86400)))&to=$(iso $((now + 3600)))"
d7="from=$(iso $((now - 7 * 86400)))&to=$(iso $((now + 3600)))"
declare -A urls=(
    [summary]="$app/v1/stats/summary?$d30"
    [timeseries]="$app/v1/stats/timeseries?$d7&bucket=hour&time_zone=Europe/Berlin"
    [breakdown]="$app/v1/stats/breakdown?$d30&group_by=campaign_id&order_by=impressions&limit=20&other=true"
)

# Partitions of `events` without a current hourly summary (see src/analytics/rollup.rs).
unsummarized() {
    sql "SELECT count() FROM (SELECT partition_id, groupBitXor(cityHash64(name)) AS fp FROM system.parts
           WHERE database = 'bench' AND table = 'events' AND active GROUP BY partition_id) AS p
         LEFT ANTI JOIN (SELECT toString(day) AS partition_id, argMax(fingerprint, generation) AS fp
           FROM events_hourly_state GROUP BY day) AS s USING (partition_id, fp)"
}
wait_summarized() {
    local t0=$SECONDS
    while [ "$(unsummarized)" != 0 ]; do sleep 0.5; done
    echo "summaries current after $((SECONDS - t0)) s ($(sql 'SELECT count() FROM events_hourly') summary rows)"
}

# Another service on the same database; $1 = ADTRACK_ROLLUP_REFRESH_MS. Sets $service (URL).
another_service() {
    local port
    port=$(free_port)
    ADTRACK_LISTEN="127.0.0.1:$port" ADTRACK_CLICKHOUSE_URL="$ch" ADTRACK_ROLLUP_REFRESH_MS=$1 \
    ADTRACK_CLICKHOUSE_DATABASE=bench ADTRACK_WAL_DIR="$tmp/wal-$port" ADTRACK_DEAD_LETTER_DIR="$tmp/dl-$port" \
    LOG_LEVEL=warn target/release/adtrack >/dev/null &
    pids+=($!)
    service="http://127.0.0.1:$port"
    wait_http "$service/health/ready"
}

run() { # $1 = state label, $2 = service base URL (default: the one with summaries)
    local base=${2:-$app}
    for name in summary timeseries breakdown; do
        # A warm-up request checks the answer and warms caches. Under load a query may hit the
        # time guard (ADTRACK_ANALYTICS_MAX_EXECUTION_MS): the statuses column shows those 422s.
        local url=${urls[$name]/#$app/$base}
        code=$(curl -s -H "$auth" -o "$OUT/$name-$1.json" -w '%{http_code}' "$url")
        [ "$code" = 200 ] || { echo "$name: HTTP $code: $(cat "$OUT/$name-$1.json")"; exit 1; }
        oha -c "$CONCURRENCY" -n "$REQUESTS" --no-tui --output-format json -H "$auth" "$url" >"$OUT/oha-$name-$1.json"
        jq -r --arg n "$name" --arg s "$1" '
            "| \($n) | \($s) | \(.latencyPercentiles.p50 * 1000 | floor) ms | \(.latencyPercentiles.p95 * 1000 | floor) ms | \(.latencyPercentiles.p99 * 1000 | floor) ms | \(.summary.requestsPerSec * 10 | floor / 10) | \(.statusCodeDistribution | to_entries | map("\(.key)×\(.value)") | join(" ")) |"' \
            "$OUT/oha-$name-$1.json" >>"$OUT/table.md"
    done
}

: >"$OUT/table.md"
wait_summarized
parts=$(sql "SELECT count() FROM system.parts WHERE database = 'bench' AND table = 'events' AND active")
run "as loaded ($parts parts), summaries"
sql "OPTIMIZE TABLE events FINAL"
wait_summarized
parts=$(sql "SELECT count() FROM system.parts WHERE database = 'bench' AND table = 'events' AND active")
run "merged ($parts parts), summaries"
# For comparison, summaries off: every query reads raw events with FINAL.
another_service 0
run "merged ($parts parts), raw only" "$service"
# The summaries never change an answer: the same random queries to both services.
benches/compare_answers.py "$app" "$service" "$key" "${COMPARE:-100}" | tail -n 5 | tee "$OUT/compare.txt"
# Two days changed since their summaries (a re-sent copy of an event in each, as continuous
# ingestion keeps today changing): a service that does not refresh them (the one that would
# is stopped) reads those days raw.
kill "$app_pid"
raw_only=$service
another_service 3600000
sql "INSERT INTO events SELECT * FROM events WHERE toDate(timestamp) IN (today(), today() - 2) LIMIT 1 BY toDate(timestamp)"
echo "unsummarized partitions: $(unsummarized)"
run "merged, 2 days changed" "$service"
benches/compare_answers.py "$service" "$raw_only" "$key" "${COMPARE:-100}" 7 | tail -n 5 | tee -a "$OUT/compare.txt"

echo
echo "$EVENTS events (+1% re-sent), $CONCURRENCY concurrent clients, $REQUESTS requests per case"
echo "| query | table state | p50 | p95 | p99 | req/s | statuses |"
echo "|---|---|---|---|---|---|---|"
cat "$OUT/table.md"
