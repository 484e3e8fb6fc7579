"""Drives scripts/healing_bench.sh: writes profiles with redis-cli (no flags),
resyncs them through the API, waits for MongoDB, then times a replay of the
dynamic topic into another collection, the live applier alone and during a
replay, and consistency checks with and without a live writer."""

import argparse
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pymongo


def call(api, token, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, method=method, headers={
        "content-type": "application/json", "authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read().decode())


def wait_ready(api, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(api + "/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"datasync did not become ready at {api}")


def redis_cli(url, payload):
    u = urllib.parse.urlparse(url)
    subprocess.run(["redis-cli", "-h", u.hostname, "-p", str(u.port or 6379), "--pipe"],
                   input=payload, check=True, capture_output=True)


def resp(*args):
    out = f"*{len(args)}\r\n"
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out


def wait_job(api, token, path):
    while True:
        job = call(api, token, path)
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)


def main():
    p = argparse.ArgumentParser()
    for a in ("--api", "--token", "--mongo", "--redis", "--prefix", "--database", "--collection"):
        p.add_argument(a, required=True)
    p.add_argument("--users", type=int, default=100000)
    a = p.parse_args()
    key = lambda i: f"{a.prefix}:user:u{i}:profile"
    since = int(time.time() * 1000) - 1000
    t = time.time()
    for start in range(0, a.users, 20000):
        redis_cli(a.redis, "".join(
            resp("SET", key(i), json.dumps({"gen": 0, "name": f"user {i}", "score": i / 2}))
            for i in range(start, min(start + 20000, a.users))).encode())
    print(f"wrote {a.users} profiles to Redis (no flags) in {time.time() - t:.1f}s")
    wait_ready(a.api)
    col = pymongo.MongoClient(a.mongo)[a.database][a.collection]

    t = time.time()
    job = call(a.api, a.token, "/v1/resync", {"all": True})
    job = wait_job(a.api, a.token, f"/v1/resync/{job['id']}")
    flag_s = time.time() - t
    print(f"resync: {job['state']}, scanned {job['scanned']}, flagged {job['flagged']} "
          f"in {flag_s:.1f}s = {job['flagged'] / flag_s:,.0f} users/s flagged")
    while col.count_documents({}) < a.users:
        time.sleep(0.5)
    e2e_s = time.time() - t
    print(f"resync end to end: {a.users} users in MongoDB after {e2e_s:.1f}s = {a.users / e2e_s:,.0f} users/s")

    def live(prefix, n):
        t = time.time()
        base = col.count_documents({})
        for start in range(0, n, 1000):
            call(a.api, a.token, "/v1/sync/dirty", {"users": [
                {"user_id": f"{prefix}{i}", "profile": {"gen": 1, "name": f"user {i}"}}
                for i in range(start, min(start + 1000, n))]})
        while col.count_documents({}) < base + n:
            time.sleep(0.2)
        return n / (time.time() - t)

    def replay(target):
        job = call(a.api, a.token, "/v1/replay",
                   {"topic": "dynamic", "from_time": since, "target_collection": target})
        t = time.time()
        job = wait_job(a.api, a.token, f"/v1/replay/{job['id']}")
        return job, job["read"] / (time.time() - t)

    n_live = min(a.users, 20000)
    alone = live("v", n_live)
    print(f"live applier alone: {n_live} new users at {alone:,.0f} users/s")
    job, rate = replay(a.collection + "_replay1")
    print(f"replay alone: {job['state']}, read {job['read']}, applied {job['applied']}, "
          f"stale {job['stale']} at {rate:,.0f} events/s")
    result = {}
    th = threading.Thread(target=lambda: result.update(r=replay(a.collection + "_replay2")))
    th.start()
    during = live("w", n_live)
    th.join()
    job, rate = result["r"]
    print(f"live applier during a replay: {during:,.0f} users/s ({during / alone:.0%} of alone); "
          f"that replay: read {job['read']} at {rate:,.0f} events/s")
    db = col.database
    for suffix in ("_replay1", "_replay2"):
        db[a.collection + suffix].drop()

    def check(label):
        t = time.time()
        job = call(a.api, a.token, "/v1/consistency/check", {"repair": False})
        job = wait_job(a.api, a.token, f"/v1/consistency/check/{job['id']}")
        print(f"consistency check ({label}): {job['state']} in {job['duration_s']:.1f}s "
              f"({time.time() - t:.1f}s wall), compared {job['compared']}, documents {job['documents']}, "
              f"findings {job['findings']}")

    check("idle")
    stop = threading.Event()

    def writer():
        gen = 1
        while not stop.is_set():
            body = {"users": [{"user_id": f"u{i}", "profile": {"gen": gen, "name": f"user {i}", "score": i / 2}}
                              for i in range(1000)]}
            call(a.api, a.token, "/v1/sync/dirty", body)
            gen += 1
            time.sleep(1)

    th = threading.Thread(target=writer)
    th.start()
    try:
        check("live writer, 1,000 users/s")
    finally:
        stop.set()
        th.join()
    col.drop()


if __name__ == "__main__":
    main()
