#!/usr/bin/env python3
"""Sends the same random POST /v1/query requests to two services on the same data and reports
every answer that differs (exit status 1 if any). Used by benches/analytics.sh to show that the
hourly summaries never change a figure: one service reads them, the other only raw events.

    benches/compare_answers.py URL_A URL_B API_KEY [COUNT] [SEED]

Requests cover the last 30 days with ranges to the millisecond, every bucket, four time zones,
grouping by campaign and/or event type, top-N with and without the other row, every ordering
metric, and campaign / event type filters (what the summaries may answer).
"""
import json
import random
import sys
import time
import urllib.error
import urllib.request

METRICS = ["events", "impressions", "clicks", "conversions", "ctr", "cvr", "spend", "revenue", "roas"]


def post(base, key, body):
    req = urllib.request.Request(
        base + "/v1/query",
        data=json.dumps(body).encode(),
        headers={"authorization": "Bearer " + key, "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def random_query(rng, now):
    def iso(t):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % rng.randrange(1000)

    span = rng.choice([3600 * 5.5, 86400 * 1.3, 86400 * 7, 86400 * 12.25, 86400 * 29.5])
    start = now - rng.uniform(span, 86400 * 30)
    body = {
        "from": iso(start),
        "to": iso(min(start + span, now + 7200)),
        "metrics": rng.sample(METRICS, rng.randrange(1, 6)),
    }
    if rng.random() < 0.6:
        body["bucket"] = rng.choice(["hour", "day", "week", "month"])
        body["time_zone"] = rng.choice(["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"])
        if body["bucket"] == "hour" and span > 86400 * 3:
            body["bucket"] = "day"
    if rng.random() < 0.7:
        body["group_by"] = rng.choice(
            [["campaign_id"], ["event_type"], ["campaign_id", "event_type"], ["event_type", "campaign_id"]]
        )
        body["limit"] = rng.choice([1, 3, 20] if "bucket" in body else [1, 3, 20, 1000])
        body["other"] = rng.random() < 0.5
        body["order_by"] = rng.choice(body["metrics"])
    r = rng.random()
    if r < 0.2:
        values = ["camp-%d" % rng.randrange(30), "camp-%d" % rng.randrange(500)]
        body["filters"] = [{"dimension": "campaign_id", "op": "in", "values": values}]
    elif r < 0.35:
        body["filters"] = [{"dimension": "event_type", "op": "neq", "values": ["impression"]}]
    elif r < 0.45:
        body["filters"] = [{"dimension": "campaign_id", "op": "not_in", "values": ["camp-0", "camp-1"]}]
    return body


def main():
    a, b, key = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    rng = random.Random(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    now = time.time()
    differ = 0
    for _ in range(count):
        body = random_query(rng, now)
        answer_a, answer_b = post(a, key, body), post(b, key, body)
        if answer_a != answer_b:
            differ += 1
            print("differs:", json.dumps(body))
            print("  ", answer_a[0], json.dumps(answer_a[1])[:400])
            print("  ", answer_b[0], json.dumps(answer_b[1])[:400])
    print(f"{count} random queries, {differ} answers differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
