"""Drives the demo: plays the upstream profile service against datasync's HTTP
API and watches MongoDB until every change has arrived."""

import argparse
import json
import time
import urllib.error
import urllib.request

import pymongo


def call(api, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.read().decode()


def wait_ready(api, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if call(api, "/health/ready")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"datasync did not become ready at {api} within {seconds}s")


def metric(api, name):
    total = 0.0
    for line in call(api, "/metrics")[1].splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def push(api, users, generation):
    for start in range(0, len(users), 500):
        batch = [
            {"user_id": u, "profile": {"name": f"User {u}", "generation": generation, "visits": generation * 10}}
            for u in users[start : start + 500]
        ]
        call(api, "/v1/sync/dirty", {"users": batch})


def wait_applied(coll, api, expected_filter, expected, label):
    t0 = time.time()
    while True:
        n = coll.count_documents(expected_filter)
        print(
            f"  {label}: {n:>6}/{expected} in MongoDB | published {metric(api, 'datasync_events_published_total'):>6}"
            f" | applied {metric(api, 'datasync_events_applied_total'):>6}",
            flush=True,
        )
        if n >= expected:
            return time.time() - t0
        if time.time() - t0 > 600:
            raise SystemExit(f"timed out: only {n}/{expected} arrived")
        time.sleep(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True)
    p.add_argument("--mongo", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--users", type=int, default=5000)
    a = p.parse_args()

    wait_ready(a.api)
    coll = pymongo.MongoClient(a.mongo)[a.database][a.collection]
    users = [f"user-{i}" for i in range(a.users)]

    print("   (published: events acknowledged by Kafka; applied: events counted once their whole")
    print("    applier window is written, so it can lag the MongoDB count by up to one window)")
    print(f"1) writing and flagging {len(users)} profiles through POST /v1/sync/dirty")
    t = time.time()
    push(a.api, users, 1)
    elapsed = wait_applied(coll, a.api, {}, len(users), "generation 1")
    print(f"   -> {len(users)} profiles synced Redis -> Kafka -> MongoDB in {time.time() - t:.1f}s")

    changed = users[::4]
    print(f"2) changing {len(changed)} of them again (generation 2)")
    t = time.time()
    push(a.api, changed, 2)
    wait_applied(coll, a.api, {"dynamicProfile.generation": 2}, len(changed), "generation 2")
    print(f"   -> {len(changed)} updates synced in {time.time() - t:.1f}s")

    doc = coll.find_one({"userId": changed[0]}, {"_id": 0})
    print("3) a document in MongoDB:")
    print("   " + json.dumps(doc, default=str))
    total = coll.count_documents({})
    gen2 = coll.count_documents({"dynamicProfile.generation": 2})
    print(f"RESULT: {total} documents, {gen2} at generation 2, "
          f"{coll.count_documents({'dataVersion': 2})} with dataVersion 2 -- "
          f"{'OK' if total == len(users) and gen2 == len(changed) else 'MISMATCH'}")
    del elapsed


if __name__ == "__main__":
    main()
