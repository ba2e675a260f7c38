#!/usr/bin/env python3
"""Chaos run: repeated multi-host loads into PostgreSQL or MySQL while workers are killed and hosts cut off.

Each run feeds gen_singer.py output through `singer-ingest --redis-url` to one `rq worker` per test host
(network namespaces on a bridge, see tests/hostnet.py; needs root). While it runs, a chaos thread
picks, every 1-3 s, one of: SIGKILL a random worker (a new one starts on that host 1-2 s later), or cut
a random host off the network for 4-8 s. Afterwards the destination is compared row by row with the
input and the last printed STATE with the input's last STATE.

    python bench/chaos.py --runs 5 --records 150000 --hosts 3
    python bench/chaos.py --destination mysql --runs 5 --records 150000 --hosts 3

The hosts reach PostgreSQL and MySQL/MariaDB on loopback through relays on the bridge (tests/hostnet.py). The
run uses test network ``--net`` (1 unless told), so the multi-host tests (network 0) can run meanwhile.

Prints one line per run and a summary: runs, kills, cuts, rows expected, rows lost, rows doubled,
wrong STATE, failed runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import psycopg2
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.expected import expected_rows, model, mysql_rows, postgres_rows  # noqa: E402
from tests.procs import kill_tree  # noqa: E402
from tests.hostnet import HostNetwork  # noqa: E402
from compare import MYSQL_URL, PG_DSN, mysql_drop  # noqa: E402  (the servers as seen from this host)

BIN = Path(sys.executable).parent
GEN = ROOT.parent / "shared" / "bench" / "gen_singer.py"


def pg_drop(schema: str) -> None:
    con = psycopg2.connect(PG_DSN)
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    con.close()


# Per destination: the workers' connection setting (to the server through the bridge's relay), the schema name
# of a run, how to read a table back (normalised like tests/expected.py), and how to drop the schema.
DESTINATIONS = {
    "postgres": {"env": lambda net: {"SINGER_INGEST_POSTGRES_DSN": net.pg_dsn},
                 "schema": lambda: f"chaos_{uuid.uuid4().hex[:8]}",
                 "rows": lambda schema, table, stream: postgres_rows(PG_DSN, schema, table, stream),
                 "drop": pg_drop},
    "mysql": {"env": lambda net: {"SINGER_INGEST_MYSQL_URL": net.mysql_url},
              "schema": lambda: f"bench_chaos_{uuid.uuid4().hex[:8]}",
              "rows": lambda schema, table, stream: mysql_rows(MYSQL_URL, schema, table, stream),
              "drop": mysql_drop},
}


class Fleet:
    def __init__(self, hosts: list[str], logdir: Path, redis_url: str, env: dict[str, str]):
        self.hosts = hosts
        self.logdir = logdir
        self.redis_url = redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SINGER_INGEST_")}, **env}
        self.started = 0

    def start(self, host: str) -> None:
        self.started += 1
        log = open(self.logdir / f"worker-{self.started}-{host}.log", "wb")
        self.procs[host] = subprocess.Popen(
            ["ip", "netns", "exec", host, str(BIN / "rq"), "worker", "singer-ingest", "--url", self.redis_url],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def kill(self, host: str) -> None:
        """SIGKILL the worker and its work horse (rq gives the horse a process group of its own)."""
        proc = self.procs[host]
        if proc.poll() is None:
            kill_tree(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, signal.SIGKILL)


def chaos(fleet: Fleet, rng: random.Random, done: threading.Event, counts: collections.Counter) -> None:
    while not done.wait(rng.uniform(1, 3)):
        host = rng.choice(fleet.hosts)
        if rng.random() < 0.6:
            fleet.kill(host)
            counts["kills"] += 1
            if done.wait(rng.uniform(1, 2)):
                fleet.start(host)
                return
            fleet.start(host)
        else:
            HostNetwork.cut(host)
            counts["cuts"] += 1
            done.wait(rng.uniform(4, 8))
            HostNetwork.restore(host)


def compare(rows, schema: str, data: bytes) -> tuple[int, int, int]:
    expected_total = lost = doubled = 0
    for name, stream in model(data).items():
        want = collections.Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in expected_rows(stream))
        got = collections.Counter(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in rows(schema, name, stream))
        expected_total += sum(want.values())
        lost += sum((want - got).values())
        doubled += sum((got - want).values())
    return expected_total, lost, doubled


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--records", type=int, default=150000)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--destination", choices=sorted(DESTINATIONS), default="postgres")
    ap.add_argument("--net", type=int, default=1, help="test network (tests/hostnet.py); the multi-host tests use 0")
    args = ap.parse_args()
    dest = DESTINATIONS[args.destination]
    if os.geteuid() != 0:
        print("chaos.py makes network namespaces: run it as root", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"singer-ingest-chaos-{uuid.uuid4().hex[:6]}"
    logdir.mkdir(parents=True)
    net = HostNetwork(hosts=args.hosts, index=args.net)
    fleet = Fleet(net.hosts, logdir, net.redis_url, dest["env"](net))
    totals = collections.Counter()
    try:
        for host in net.hosts:
            fleet.start(host)
        for n in range(1, args.runs + 1):
            data = subprocess.run([sys.executable, str(GEN), "--records", str(args.records), "--seed", str(n),
                                   "--state-every", "1000"], check=True, capture_output=True).stdout
            schema = dest["schema"]()
            config = logdir / f"run{n}.json"
            config.write_text(json.dumps({"destination": args.destination, "default_target_schema": schema,
                                          "lease_ttl_seconds": 3, "batch_size_rows": 1000}))
            counts: collections.Counter = collections.Counter()
            done = threading.Event()
            start = time.monotonic()
            feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", str(config), "--redis-url",
                                       net.redis_url],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            monkey = threading.Thread(target=chaos, args=(fleet, rng, done, counts))
            monkey.start()
            out, err = feeder.communicate(data, timeout=900)
            done.set()
            monkey.join()
            for host in net.hosts:
                HostNetwork.restore(host)
                if fleet.procs[host].poll() is not None:
                    fleet.start(host)
            seconds = time.monotonic() - start
            states = [orjson.loads(line)["value"] for line in out.splitlines()]
            wrong_state = int(not states or states[-1] != model(data)["users"]["last_state"])
            expected, lost, doubled = compare(dest["rows"], schema, data) if feeder.returncode == 0 else (0, 0, 0)
            totals.update(runs=1, kills=counts["kills"], cuts=counts["cuts"], expected=expected, lost=lost,
                          doubled=doubled, wrong_state=wrong_state, failed=int(feeder.returncode != 0))
            print(f"run {n}: {seconds:.1f} s, exit {feeder.returncode}, kills {counts['kills']}, cuts {counts['cuts']}, "
                  f"rows expected {expected}, lost {lost}, doubled {doubled}, wrong STATE {wrong_state}", flush=True)
            if feeder.returncode != 0:
                print("  " + err.decode().strip().splitlines()[-1], flush=True)
            dest["drop"](schema)
    finally:
        fleet.stop()
        net.close()
    print(f"\nruns {totals['runs']}, kills {totals['kills']}, cuts {totals['cuts']}, rows expected {totals['expected']}, "
          f"rows lost {totals['lost']}, rows doubled {totals['doubled']}, wrong STATE {totals['wrong_state']}, "
          f"failed runs {totals['failed']}  (logs: {logdir})")
    return 0 if not (totals["lost"] or totals["doubled"] or totals["wrong_state"] or totals["failed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
