"""Benchmark the site roster (facedoor.fleet) with real Mosquitto and N roster-only door processes.

For each N (default 10, 50, 200) doors (`facedoor fleet agent`, one process and store each) on one
broker, then --bridge-doors doors behind a second broker bridged to the first (the second site):

- revocation: `facedoor remove NAME` run as a command at the office door; the time from starting
  that command to the last door's sealed record saying it applied the new manifest (p50 and p99
  over the revocations), and the same from the moment the tombstone reached the broker (what the
  roster itself adds: the command's own start-up, about a second of Python imports on a busy
  2-core machine, is the rest);
- bytes retained on the broker per change (the tombstone entry plus the new manifest);
- memory per door: median RSS and PSS of the door processes;
- catch-up (first N only): a door offline during --offline-changes changes (enrolments and removals
  published one at a time), then started: time from its start, and from its reconnect, to its
  roster being current (before that it decides nothing);
- a full roster of --people people (3 photos each, 128-D): bytes retained, and the time a new door
  takes from its start (and from its connect) until it applied all of it.

Door records are verified with the site key; every time is from one clock (this machine's).

    .venv/bin/python benchmarks/fleet.py                      # about 10 minutes on 2 busy cores
    .venv/bin/python benchmarks/fleet.py --doors 10 --revocations 5 --bridge-doors 10   # quick

Targets: revocation p99 <= 1 s with 50 doors on one broker, <= 2 s across a bridge; 1,000 people
<= 2 MB retained, applied from scratch <= 5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from facedoor.config import load_config
from facedoor.demo.broker import PrivateBroker, Subscriber
from facedoor.fleet import SiteKeys, publish_changes
from facedoor.store import EmbeddingStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fleet_support import (  # noqa: E402
    ROSTER_ENCODER,
    SITE,
    Agent,
    DoorRecords,
    bridged_pair,
    cli,
    roster_models,
    site_config,
    site_key,
    wait_until,
)

RNG = np.random.default_rng(7)
# ack_timeout_s 5: on a 2-core machine shared with 200 door processes (and other work), a PUBACK can
# take over the default second, which a door rightly treats as a stalled broker (and reconnects)
QUIET = {"logging": {"level": "INFO", "format": "json"}, "mqtt": {"health_interval_s": 30.0, "ack_timeout_s": 5.0}}


def unit_rows(n: int, dim: int = 128) -> np.ndarray:
    rows = RNG.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def enrol(store: EmbeddingStore, name: str, photos: int = 3) -> None:
    store.enroll(name, unit_rows(photos), [os.urandom(32).hex() for _ in range(photos)])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of PID in kB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def retained_bytes(broker: PrivateBroker, topic: str) -> dict[str, int]:
    """Payload bytes of every retained message under TOPIC (ending in /#), by topic."""
    sub = Subscriber(broker.host, broker.port, topic)
    marker = topic[:-1] + "bench-marker"  # behind the retained messages of the subscription
    sub.client.publish(marker, b"x", qos=1)
    sub.wait_for(lambda m: m["topic"] == marker, 10)
    sub.stop()
    return {m["topic"]: len(m["raw"]) for m in sub.messages if m["retain"]}


class Site:
    """One broker (or a bridged pair), the office door that publishes, and N roster-only doors."""

    def __init__(self, work: Path, key: Path, models: Path, publish_broker: PrivateBroker,
                 door_broker: PrivateBroker):
        self.work, self.key, self.models = work, key, models
        self.pub_broker, self.door_broker = publish_broker, door_broker
        self.office = site_config(work, "office", models, publish_broker.port, key, **QUIET)
        self.keys = SiteKeys.derive(SITE, key.read_bytes().strip())
        self.records = DoorRecords(door_broker.host, door_broker.port, self.keys)
        self.agents: dict[str, Agent] = {}

    def start_doors(self, n: int) -> None:
        for i in range(n):
            door_id = f"door{i:03d}"
            self.agents[door_id] = Agent(site_config(self.work, door_id, self.models, self.door_broker.port,
                                                     self.key, **QUIET))

    def manifest(self) -> int:
        with EmbeddingStore(load_config(self.office).store, ROSTER_ENCODER, readonly=True) as store:
            return store.roster()["manifest"].version

    def wait_current(self, doors: list[str], version: int, timeout: float) -> dict[str, float]:
        """Receive time of each door's first record at VERSION or later, ready."""
        def firsts() -> dict[str, float] | None:
            got: dict[str, float] = {}
            for t, r in self.records.all():
                if r.key in doors and r.version >= version and r.meta.get("ready") and r.key not in got:
                    got[r.key] = t
            return got if len(got) == len(doors) else None
        return wait_until(firsts, timeout, f"{len(doors)} doors at manifest v{version}", poll=0.05)

    def seed(self, names: list[str]) -> None:
        cfg = load_config(self.office)
        with EmbeddingStore(cfg.store, ROSTER_ENCODER) as store:
            for name in names:
                enrol(store, name)
            publish_changes(cfg, store, names)

    def revoke(self, name: str, doors: list[str], timeout: float) -> tuple[float, float, float, int, str]:
        """`facedoor remove NAME`: (command -> last door, tombstone at broker -> last door, command seconds,
        tombstone bytes, where the command's publish spent its time)."""
        topic = f"facedoor/site/{SITE}/entry/{self.keys.person_key(name)}"
        watch = Subscriber(self.pub_broker.host, self.pub_broker.port, topic)
        watch.wait_count(topic, 1, 5)  # the current (enrolment) entry, retained
        target = self.manifest() + 1
        t0 = time.time()
        done = cli(self.office, "remove", name)
        took = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        messages = watch.wait_count(topic, 2, 10)
        watch.stop()
        tomb = messages[1]
        times = self.wait_current(doors, target, timeout)
        last = max(times.values())
        return last - t0, last - tomb["recv"], took, len(tomb["raw"]), publish_phases(done.stderr)

    def memory(self) -> tuple[float, float]:
        mem = [memory_kb(a.proc.pid) for a in self.agents.values() if a.proc.poll() is None]
        return statistics.median(m[0] for m in mem) / 1024, statistics.median(m[1] for m in mem) / 1024

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.proc.terminate()
        for agent in self.agents.values():
            agent.stop()
        self.agents.clear()
        self.records.stop()


def publish_phases(stderr: str) -> str:
    """Where the command's publish spent its time, as it says on stderr (connect, read, entries, manifest)."""
    said = [line.split(") in ", 1)[-1] for line in stderr.splitlines() if "published to site" in line]
    return f"publish {said[-1]}" if said else "no publish line"


def log_time(agent: Agent, event: str) -> float:
    """Wall time of AGENT's latest log record with EVENT (its log file is shared by its runs)."""
    latest = agent.events(event)[-1]
    return datetime.fromisoformat(latest["ts"].replace("Z", "+00:00")).timestamp()


def catch_up(site: Site, changes: int) -> tuple[float, float]:
    """A door offline while CHANGES changes are published, then started: (from start, from connect) to current."""
    door = "late"
    config = site_config(site.work, door, site.models, site.door_broker.port, site.key, **QUIET)
    agent = Agent(config)
    site.wait_current([door], site.manifest(), 60)
    agent.stop()
    cfg = load_config(site.office)
    with EmbeddingStore(cfg.store, ROSTER_ENCODER) as store:
        for i in range(changes):
            name = f"churn{i // 2}"
            if i % 2 == 0:
                enrol(store, name)
            else:
                store.remove(name)
            publish_changes(cfg, store, [name])
    target = site.manifest()
    t0 = time.time()
    agent = Agent(config)
    first = site.wait_current([door], target, 60)[door]
    connected = log_time(agent, "mqtt_up")
    agent.stop()
    return first - t0, first - connected


def full_roster(work: Path, key: Path, models: Path, people: int) -> tuple[int, float, float, float]:
    """PEOPLE enrolled and published on a fresh broker: (bytes retained, publish seconds, a new door's
    seconds to current from its start, and from its connect)."""
    broker = PrivateBroker(work / "broker-full")
    broker.start()
    try:
        site = Site(work / "full", key, models, broker, broker)
        cfg = load_config(site.office)
        names = [f"person{i:04d}" for i in range(people)]
        with EmbeddingStore(cfg.store, ROSTER_ENCODER) as store:
            for name in names:
                enrol(store, name)
            t0 = time.time()
            publish_changes(cfg, store, names)
            publish_s = time.time() - t0
        size = sum(b for t, b in retained_bytes(broker, f"facedoor/site/{SITE}/#").items() if "/door/" not in t)
        config = site_config(site.work, "newdoor", models, broker.port, key, **QUIET)
        t0 = time.time()
        agent = Agent(config)
        ready = site.wait_current(["newdoor"], site.manifest(), 120)["newdoor"]
        connected = log_time(agent, "mqtt_up")
        agent.stop()
        site.records.stop()
        return size, publish_s, ready - t0, ready - connected
    finally:
        broker.stop()


def measure(site: Site, n: int, revocations: int, with_catch_up: int) -> dict[str, object]:
    names = [f"member{i:03d}" for i in range(revocations + 5)]
    site.seed(names)
    t0 = time.time()
    site.start_doors(n)
    doors = list(site.agents)
    site.wait_current(doors, site.manifest(), 120 + 2 * n)
    startup = time.time() - t0
    rows = [site.revoke(name, doors, 30 + n / 10) for name in names[:revocations]]
    sizes = retained_bytes(site.pub_broker, f"facedoor/site/{SITE}/#")
    manifest = next(b for t, b in sizes.items() if t.endswith("/manifest"))
    tomb = round(statistics.median(r[3] for r in rows))
    rss, pss = site.memory()
    out: dict[str, object] = {
        "doors": n, "startup_s": startup,
        "cmd_p50": pct([r[0] for r in rows], 50), "cmd_p99": pct([r[0] for r in rows], 99),
        "pub_p50": pct([r[1] for r in rows], 50), "pub_p99": pct([r[1] for r in rows], 99),
        "cmd_s": statistics.median(r[2] for r in rows),
        "slowest": f"{max(r[2] for r in rows):.2f} s ({max(rows, key=lambda r: r[2])[4]})",
        "change_bytes": tomb + manifest, "rss_mb": rss, "pss_mb": pss,
    }
    if with_catch_up:
        out["catch_up"] = catch_up(site, with_catch_up)
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mosq = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (shared; load average {load}), "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, {mosq}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doors", default="10,50,200", help="door counts on one broker")
    parser.add_argument("--bridge-doors", type=int, default=50, help="doors behind the bridged broker (0: skip)")
    parser.add_argument("--revocations", type=int, default=10, help="revocations per door count")
    parser.add_argument("--offline-changes", type=int, default=100)
    parser.add_argument("--people", type=int, default=1000)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="facedoor-fleet-") as tmp:
        work = Path(tmp)
        key, models = site_key(work / "site.key"), roster_models(work / "models")
        for i, n in enumerate(int(x) for x in args.doors.split(",") if x):
            broker = PrivateBroker(work / f"broker-{n}")
            broker.start()
            site = Site(work / f"one-{n}", key, models, broker, broker)
            try:
                row = measure(site, n, args.revocations if n <= 50 else max(3, args.revocations // 2),
                              args.offline_changes if i == 0 else 0)
                results.append(("one broker", row))
                print(json.dumps({"setup": "one broker", **row}), flush=True)
            except AssertionError as exc:  # say how far it got, and go on with the other setups
                latest = site.records.latest()
                print(f"one broker, {n} doors: {exc}; {sum(bool(r.meta.get('ready')) for r in latest.values())} "
                      f"of {n} doors reported ready", flush=True)
            finally:
                site.stop()
                broker.stop()
        if args.bridge_doors:
            a, b = bridged_pair(work)
            a.start()
            b.start()
            site = Site(work / "bridged", key, models, a, b)
            try:
                row = measure(site, args.bridge_doors, args.revocations, 0)
                results.append(("bridged", row))
                print(json.dumps({"setup": "bridged", **row}), flush=True)
            finally:
                site.stop()
                b.stop()
                a.stop()
        full = full_roster(work, key, models, args.people) if args.people else None
    print()
    print(f"machine: {machine()}")
    print()
    print("| setup | doors | revoke: command -> last door p50 / p99 | tombstone at broker -> last door p50 / p99 "
          "| bytes retained per change | memory per door (RSS / PSS) |")
    print("|---|---:|---:|---:|---:|---:|")
    for setup, r in results:
        print(f"| {setup} | {r['doors']} | {r['cmd_p50']:.2f} s / {r['cmd_p99']:.2f} s | "
              f"{r['pub_p50']:.2f} s / {r['pub_p99']:.2f} s | {r['change_bytes']:,} B | "
              f"{r['rss_mb']:.0f} MB / {r['pss_mb']:.0f} MB |")
    first = results[0][1] if results else {}
    if "catch_up" in first:
        cu = first["catch_up"]
        assert isinstance(cu, tuple)
        print(f"\ncatch-up after {args.offline_changes} changes offline ({first['doors']} doors): "
              f"{cu[0]:.2f} s from start, {cu[1]:.2f} s from connect to current (deciding nothing before)")
    if full is not None:
        size, publish_s, from_start, from_connect = full
        print(f"full roster of {args.people} people (3 photos each): {size / 1e6:.2f} MB retained "
              f"({size / args.people:.0f} B per person), published in {publish_s:.2f} s; a new door applied it "
              f"{from_start:.2f} s from its start, {from_connect:.2f} s from its connect")
    for setup, r in results:
        print(f"slowest `facedoor remove`, {setup}, {r['doors']} doors: {r['slowest']}")
    print(f"(`facedoor remove` itself took a median {statistics.median(float(r['cmd_s']) for _, r in results):.2f} s "
          "wall, Python start-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
