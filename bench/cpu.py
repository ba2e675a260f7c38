#!/usr/bin/env python3
"""Where the CPU of one distributed run goes: CPU seconds of each process over one load into PostgreSQL or MySQL.

    python bench/cpu.py --records 1000000 [--runs 3] [--workers 1] [--destination mysql]

Runs singer-ingest with ``--workers`` `rq worker` processes (as bench/compare.py does) and reads each
process's user + system time from ``/proc/<pid>/stat``: the workers (with the work-horse processes RQ
forks), the feeder, every PostgreSQL backend (or the MariaDB / MySQL server) and Redis. Prints records/s, the CPU seconds of each, their
sum against the wall time (the machine's cores bound what fits), and the workers' peak RSS. Linux only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import BENCHES, BIN, GEN, REDIS_URL, Bench, start_workers  # noqa: E402

from tests.procs import descendants, hwm_kb  # noqa: E402  (compare puts the project root on the path)

HZ = os.sysconf("SC_CLK_TCK")
SERVERS = {"postgres": ("PostgreSQL", ("postgres",)), "mysql": ("MySQL", ("mariadbd", "mysqld"))}


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / HZ  # utime, stime


def named(command: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == command:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def server_cpu(commands: tuple[str, ...]) -> float:
    return sum(cpu_seconds(pid) for command in commands for pid in named(command))


def run_once(data: Path, records: int, workers: int, tmp: Path, bench: Bench) -> dict:
    schema = f"bench_cpu_{uuid.uuid4().hex[:6]}"
    server = SERVERS[bench.name][1]
    procs, env = start_workers(workers, schema, tmp, bench)
    horses: dict[int, float] = {}  # a work-horse's CPU, kept after it exits
    rss: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for p in procs:
                for child in descendants(p.pid):
                    horses[child] = max(horses.get(child, 0.0), cpu_seconds(child))
                    rss[child] = max(rss.get(child, 0), hwm_kb(child) // 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = {"server": server_cpu(server),
              "redis": sum(map(cpu_seconds, named("redis-server"))),
              "worker": sum(cpu_seconds(p.pid) for p in procs)}
    started = time.monotonic()
    try:
        with open(data, "rb") as fh:
            feeder = subprocess.Popen([str(BIN / "singer-ingest"), "--config", str(tmp / "si.json"), "--redis-url",
                                       REDIS_URL], stdin=fh, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=env)
            err = feeder.stderr.read().decode()  # until the feeder closes it, at its exit
            os.waitid(os.P_PID, feeder.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its /proc stays
            feeder_cpu = cpu_seconds(feeder.pid)
            feeder.wait()
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        if feeder.returncode != 0:
            raise RuntimeError(f"singer-ingest failed: {err[-2000:]}")
        result = {"wall": wall, "rate": records / wall, "feeder": feeder_cpu,
                  "server": server_cpu(server) - before["server"],
                  "redis": sum(map(cpu_seconds, named("redis-server"))) - before["redis"],
                  "worker": sum(cpu_seconds(p.pid) for p in procs) - before["worker"] + sum(horses.values()),
                  "worker_rss": max(rss.values(), default=0)}
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
        bench.drop(schema)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--destination", choices=sorted(BENCHES), default="postgres")
    args = ap.parse_args()
    bench = BENCHES[args.destination]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = tmp / "input.singer"
        with open(data, "wb") as fh:
            subprocess.run([sys.executable, str(GEN), "--records", str(args.records)], stdout=fh, check=True)
        print(f"input: gen_singer.py --records {args.records}; {args.workers} worker(s); CPU seconds from /proc")
        for n in range(args.runs):
            r = run_once(data, args.records, args.workers, tmp, bench)
            total = r["worker"] + r["server"] + r["feeder"] + r["redis"]
            print(f"run {n + 1}: {r['rate']:,.0f} records/s in {r['wall']:.2f} s; CPU s: worker {r['worker']:.2f}, "
                  f"{SERVERS[bench.name][0]} {r['server']:.2f}, feeder {r['feeder']:.2f}, Redis {r['redis']:.2f}; "
                  f"total {total:.2f} = {total / r['wall']:.2f} cores busy; worker peak RSS {r['worker_rss']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
