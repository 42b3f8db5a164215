"""Fault table (issue 10, "Done when"): the real door under the faults a door meets, one row each.

The door of benchmarks/stalls.py (the real `facedoor run` subprocess on a looping walk-up video
of an enrolled person, unlock action with relock after 1 s, cooldown 2 s, TTL 5 s, ack timeout
1 s, a private Mosquitto, a recorder on the relay, decision and health topics) meets, in turn:

- broker down: Mosquitto stopped for 5 s, started again on the same port;
- broker stalled 0.5 / 3 / 12 / 40 s: one stall trial each (SIGSTOP/SIGCONT, benchmarks/stalls.py);
- disk full for the audit log: the audit log lives on its own 256 KiB tmpfs, filled with `dd`
  until the daemon logs a failed write, then 5 s more, then freed (without the privilege to
  mount, a directory takes the audit file's place);
- camera gone: an MJPEG camera (tests/daemon_support.py `MjpegCamera`) down for 5 s, then up;
- store edited while running: `facedoor enroll` of a new person, then `facedoor remove` of the
  person at the door, through the CLI while the daemon runs (no SIGHUP);
- store corrupted while running: the SQLite file overwritten with random bytes (no SIGHUP);
- model file replaced: `facenet.onnx` swapped for another ONNX file, then the daemon restarted:
  it must refuse (exit 2) and decide nothing;
- clock stepped +-1 h: the daemon runs under libfaketime (`apt-get install faketime`), wall
  clock only (CLOCK_MONOTONIC untouched, as an NTP step leaves it); its wall clock steps +1 h,
  then -1 h, then back; the machine's clock is never changed. libfaketime 0.9.10 fails
  `clock_nanosleep` with that setting, so the daemon is started through a shim that makes
  `time.sleep` an `Event.wait`;
- SIGKILL mid-enrolment: `facedoor enroll` killed at random moments (30-100 % of its measured
  run time) on copies of the store; the store must stay valid holding nothing or everything.

Outcomes per fault: relay unlocks seen, unlocks delivered after their `expires_at_ms` (target 0),
decisions delivered after theirs (late / all), recovery time, and data lost (target 0): decisions
the daemon logged that are missing from its audit log, or store contents lost. Each row's
measurement is explained under the table.

    cd /work/wt-faults
    PYTHONPATH=daemon:export:stylize nice .venv/bin/python benchmarks/faults.py   # about 5 minutes on 2 busy cores
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from facedoor.audit import read_entries
from facedoor.demo.broker import PrivateBroker
from facedoor.demo.walkup import Visitor, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_support import FACEDOOR, Daemon, MjpegCamera  # noqa: E402
from stalls import (  # noqa: E402
    DECISION_TOPIC,
    HEALTH_TOPIC,
    RELAY_TOPIC,
    RELOCK_S,
    STALLS_S,
    TTL_S,
    Door,
    Recorder,
    door_config,
    enroll,
    facedoor_cli,
    find_models,
    format_table,
    is_on,
    late,
    lateness,
    prepare_door,
    stall_trial,
    start_door,
    train_photos,
)

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SLEEP_SHIM = (
    "import sys, threading, time\n"
    "time.sleep = lambda s: threading.Event().wait(s)\n"
    "from facedoor.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
NEWCOMER = "elton_john"
OBSERVE_S = 6.0


@dataclass(frozen=True)
class Row:
    """One line of the fault table, and what was measured for it (printed under the table)."""

    fault: str
    unlocks: str
    late_unlocks: str
    late_decisions: str
    recovery: str
    data_lost: str
    note: str


@dataclass(frozen=True)
class Window:
    """A fault's time span (epoch s) on a running door and its recovery time."""

    fault: str
    since: float
    until: float
    recovery_s: float | None
    note: str


def seconds(value: float | None, none: str = "none in 60 s") -> str:
    return none if value is None else f"{value:.1f} s"


def traffic(recorder: Recorder, since: float, until: float) -> tuple[str, str, str]:
    """Relay unlocks, late relay unlocks and late/all decisions that arrived in [SINCE, UNTIL]."""
    ons = [m for m in recorder.select(RELAY_TOPIC, since, until) if is_on(m)]
    decisions = recorder.select(DECISION_TOPIC, since, until)
    overdue = [lateness(m) for m in decisions if late(m)]
    return str(len(ons)), str(sum(map(late, ons))), f"{len(overdue)}/{len(decisions)}" + (
        f" ({', '.join(overdue)})" if overdue else "")


def fresh_decision(recorder: Recorder, after: float, timeout: float = 60.0) -> float | None:
    """Seconds from AFTER to the arrival of the first decision captured after it (None: none came)."""
    found = recorder.wait_for(lambda m: m.topic == DECISION_TOPIC and m.body["ts_ms"] / 1000 > after, timeout)
    return None if found is None else found.recv - after


def settle(recovery_s: float | None, since: float) -> float:
    """Wait until a relock after the recovery decision has arrived; the end of the fault's window."""
    end = since + (recovery_s or 0.0) + RELOCK_S + 0.5
    time.sleep(max(0.0, end - time.time()))
    return end


def log_time(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


def audit_missing(daemon: Daemon, audit: Path, since: float = 0.0, until: float = float("inf")) -> int:
    """Decisions the daemon logged in [SINCE, UNTIL] (log time) that its audit log lacks."""
    logged = {r["id"] for r in daemon.events("decision") if since <= log_time(r) <= until}
    return len(logged - {e.get("id") for e in read_entries(audit)})


def corrupt_lines(audit: Path) -> int:
    """Lines of AUDIT that are not JSON objects."""
    bad = 0
    for raw in audit.read_bytes().splitlines():
        try:
            bad += not isinstance(json.loads(raw), dict)
        except ValueError:
            bad += 1
    return bad


@contextmanager
def running(door: Door, broker: PrivateBroker, name: str, **kwargs: Any) -> Iterator[tuple[Daemon, Recorder]]:
    """A started door (first unlock seen); terminated, with its log flushed, on exit."""
    daemon, recorder = start_door(door, broker, name, **kwargs)
    try:
        yield daemon, recorder
    finally:
        try:
            daemon.terminate()
        except subprocess.TimeoutExpired:
            pass  # killed below; the table shows what it delivered until then
        daemon.kill()
        recorder.stop()


def rows_of(windows: list[Window], recorder: Recorder, daemon: Daemon, audit: Path) -> list[Row]:
    """Table rows for WINDOWS of one daemon run (after it stopped, so its audit log is complete)."""
    return [Row(w.fault, *traffic(recorder, w.since, w.until), seconds(w.recovery_s),
                str(audit_missing(daemon, audit, w.since, w.until)), w.note) for w in windows]


def block_audit(audit: Path, tmpfs: bool) -> Callable[[], None]:
    """Make appends to AUDIT fail: fill its tmpfs (or, without one, put a directory in its place); returns the undo."""
    if tmpfs:
        filler = audit.with_name("filler")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
        return filler.unlink
    aside = audit.with_name("audit.aside")
    audit.rename(aside)
    audit.mkdir()

    def undo() -> None:
        audit.rmdir()
        aside.rename(audit)
    return undo


def broker_and_disk_faults(door: Door, broker: PrivateBroker, rng: random.Random) -> list[Row]:
    """Broker down, broker stalled 0.5/3/12/40 s and disk full for the audit log, on one running door."""
    audit_dir = door.work / "audit-a"
    audit_dir.mkdir()
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(audit_dir)],
                           capture_output=True).returncode == 0
    audit = audit_dir / "audit.jsonl"
    windows: list[Window] = []
    try:
        with running(door, broker, "door-a", audit={"enabled": True, "path": str(audit)}) as (daemon, recorder):
            t0 = time.time()
            broker.stop()
            time.sleep(5.0)
            broker.start()
            t_up = time.time()
            recovery = fresh_decision(recorder, t_up)
            windows.append(Window("broker down 5 s", t0, settle(recovery, t_up), recovery,
                                  "Mosquitto stopped 5 s; recovery = broker back -> first fresh decision"))
            for length in STALLS_S:
                t0 = time.time()
                trial = stall_trial(broker, recorder, length, rng)
                windows.append(Window(f"broker stalled {length:g} s", t0, time.time(), trial.recovery_s,
                                      f"SIGSTOP {length:g} s at a random moment; the daemon reported "
                                      f"{trial.stalls_reported} stall(s); longest relay ON->OFF "
                                      f"{seconds(trial.any_on_held_s, '-')}; recovery = SIGCONT -> fresh decision"))
            t_full = time.time()
            undo = block_audit(audit, tmpfs)
            while time.time() - t_full < 60 and "cannot write audit log" not in daemon.log():
                time.sleep(0.2)  # the file's last page may still take a few entries
            full_s = time.time() - t_full + 5.0
            time.sleep(5.0)
            undo()
            t_free = time.time()
            while time.time() - t_free < 30 and not any(e.get("ts_ms", 0) / 1000 > t_free for e in read_entries(audit)):
                time.sleep(0.2)
            written_again = time.time() - t_free
            t_end = settle(fresh_decision(recorder, t_free), t_free)
        rows = rows_of(windows, recorder, daemon, audit)
        lost_full = audit_missing(daemon, audit, t_full, t_free)
        lost_after = audit_missing(daemon, audit, t_free + 0.5)
        how = ("256 KiB tmpfs filled with dd until the daemon logged a failed write, then 5 s more" if tmpfs
               else "no tmpfs (mount refused): a directory in the file's place")
        rows.append(Row(
            f"disk full (audit log) {full_s:.0f} s", *traffic(recorder, t_full, t_end), f"{written_again:.1f} s",
            str(lost_after),
            f"{how}; recovery = space freed -> first new audit entry; data lost = decisions logged after the "
            f"space came back missing from the audit log ({lost_full} dropped while full, by design, the failure "
            f"logged; "
            f"{corrupt_lines(audit)} corrupt line(s) left in the file)",
        ))
        return rows
    finally:
        if tmpfs:
            subprocess.run(["umount", str(audit_dir)], capture_output=True)


def camera_fault(door: Door, broker: PrivateBroker) -> Row:
    """An MJPEG camera that goes down for 5 s and comes back."""
    camera = MjpegCamera(list(render([Visitor(door.person, door.photo)], fps=10.0, visit_s=8.0, gap_s=0.5)), fps=10.0)
    camera.up()
    audit = door.work / "audit-b.jsonl"
    try:
        with running(door, broker, "door-b", source=camera.url, audit={"enabled": True, "path": str(audit)},
                     camera={"stall_timeout_s": 1.0, "reopen_backoff_initial_s": 0.2, "reopen_backoff_max_s": 1.0}
                     ) as (daemon, recorder):
            t0 = time.time()
            camera.down()
            time.sleep(5.0)
            t_up = time.time()
            camera.up()
            recovery = fresh_decision(recorder, t_up)
            t_end = settle(recovery, t_up)
    finally:
        camera.down()
    blind = [m for m in recorder.select(DECISION_TOPIC, t0, t_end) if t0 + 1.5 < m.body["ts_ms"] / 1000 < t_up]
    return Row("camera gone 5 s", *traffic(recorder, t0, t_end), seconds(recovery),
               str(audit_missing(daemon, audit, t0, t_end)),
               f"MJPEG camera down 5 s; {len(blind)} decision(s) captured while it was down (expected 0); "
               "recovery = camera up -> first fresh decision")


def listing(models: Path, store: Path) -> dict[str, int] | None:
    """`facedoor list --json`: identity -> embeddings, None when the CLI refuses the store."""
    done = facedoor_cli(models, store, "list", "--json")
    if done.returncode != 0:
        return None
    return {r["identity"]: r["embeddings"] for r in map(json.loads, done.stdout.splitlines())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def first_deny(recorder: Recorder, after: float) -> float | None:
    """Seconds from AFTER to the capture of the first deny decision captured after it (None: none)."""
    found = [m.body["ts_ms"] / 1000 - after for m in recorder.select(DECISION_TOPIC)
             if m.body["ts_ms"] / 1000 > after and m.body["decision"] == "deny"]
    return min(found, default=None)


def unlocks_after(recorder: Recorder, after: float, until: float) -> int:
    """Relay unlocks whose decision was captured between 1 s after AFTER and UNTIL."""
    return sum(is_on(m) and after + 1.0 < m.body["expires_at_ms"] / 1000 - TTL_S < until
               for m in recorder.select(RELAY_TOPIC))


def store_and_model_faults(door: Door, broker: PrivateBroker) -> list[Row]:
    """Store edited, then corrupted, while the door runs; then a model file replaced and the door restarted."""
    models = door.work / "models-c"
    models.mkdir()
    for item in door.models.iterdir():
        (models / item.name).symlink_to(item.resolve())
    store = door.work / "store-c.db"
    shutil.copy(door.store, store)
    door_c = dataclasses.replace(door, models=models, store=store)
    audit_path = door.work / "audit-c.jsonl"
    audit = {"enabled": True, "path": str(audit_path)}
    before = listing(models, store) or {}
    with running(door_c, broker, "door-c", audit=audit) as (daemon, recorder):
        enroll(models, store, NEWCOMER, count=3)
        t_removed = time.time()
        removed = facedoor_cli(models, store, "remove", door.person).returncode
        after_edit = listing(models, store) or {}
        time.sleep(OBSERVE_S)
        t_corrupt = time.time()
        garbage = os.urandom(8192)
        store.write_bytes(garbage)
        for extra in (store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
            extra.unlink(missing_ok=True)
        time.sleep(OBSERVE_S)
        t_model = time.time()
        untouched = store.read_bytes() == garbage
        store_error = recorder.select(HEALTH_TOPIC)[-1].body.get("store_error")
        store.write_bytes(door.store.read_bytes())  # a good store again: only the model is wrong at the restart
        (models / "facenet.onnx").unlink()
        shutil.copy(door.models / "mtcnn_onet.onnx", models / "facenet.onnx")
        time.sleep(3.0)
    expected = {**{k: v for k, v in before.items() if k != door.person}, NEWCOMER: after_edit.get(NEWCOMER, 0)}
    store_lost = sum(after_edit.get(k) != v for k, v in expected.items()) + (NEWCOMER not in after_edit)
    rows = [
        Row("store edited while running", *traffic(recorder, t_removed, t_corrupt),
            seconds(first_deny(recorder, t_removed), f"not revoked in {OBSERVE_S:g} s"),
            str(store_lost + audit_missing(daemon, audit_path, t_removed, t_corrupt)),
            f"`facedoor enroll {NEWCOMER}` then `facedoor remove {door.person}` (exit {removed}) while running, "
            f"no SIGHUP; {unlocks_after(recorder, t_removed, t_corrupt)} relay unlock(s) for decisions captured "
            f"> 1 s after the removal (issue 10 item 3 expects 0); recovery = removal -> first deny"),
        Row("store corrupted while running", *traffic(recorder, t_corrupt, t_model),
            seconds(first_deny(recorder, t_corrupt), f"not closed in {OBSERVE_S:g} s"),
            str((not untouched) + audit_missing(daemon, audit_path, t_corrupt, t_model)),
            f"store overwritten with 8 KiB of random bytes, no SIGHUP; {unlocks_after(recorder, t_corrupt, t_model)} "
            f"relay unlock(s) for decisions captured > 1 s after it (fail closed expects 0); health store_error: "
            f"{store_error!r}; the garbage file was {'left untouched' if untouched else 'REWRITTEN'}"),
    ]
    restart = Recorder(broker.host, broker.port, (RELAY_TOPIC, DECISION_TOPIC))
    t_restart = time.time()
    again = Daemon(door_config(door_c, broker.port, "door-c-restart", audit=audit), str(door.video), "--loop")
    try:
        rc: int | str = again.wait(90)
    except subprocess.TimeoutExpired:
        rc = "none (still running after 90 s)"
    finally:
        again.kill()
        restart.stop()
    exit_s = time.time() - t_restart
    error = next((line for line in again.log().splitlines() if "error:" in line), "no error line")
    rows.append(Row("model file replaced, restart", *traffic(restart, t_restart, time.time()),
                    f"refused: exit {rc} in {exit_s:.1f} s", str(audit_missing(daemon, audit_path, t_model)),
                    f"facenet.onnx replaced by another ONNX file while running (the running door keeps its "
                    f"loaded model), then restarted; expected exit 2; its error: {error[:220]}"))
    return rows


def clock_fault(door: Door, broker: PrivateBroker) -> Row:
    """The daemon's wall clock (libfaketime) stepped +1 h, then -1 h, then back, while it runs."""
    if not LIBFAKETIME.is_file():
        return Row("clock stepped +-1 h", "-", "-", "-", "-", "-", f"not measured: {LIBFAKETIME} missing "
                   "(apt-get install faketime)")
    offset_file = door.work / "faketime"
    offset_file.write_text("+0\n")
    env = {**os.environ, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(offset_file),
           "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    audit = door.work / "audit-d.jsonl"
    with running(door, broker, "door-d", env=env, prefix=[sys.executable, "-c", SLEEP_SHIM],
                 audit={"enabled": True, "path": str(audit)}) as (daemon, recorder):
        t0 = time.time()
        for offset in (3600, -3600):
            offset_file.write_text(f"{offset:+d}\n")
            time.sleep(OBSERVE_S + 1.0)
        offset_file.write_text("+0\n")
        t_back = time.time()
        fixed = recorder.wait_for(lambda m: m.topic == DECISION_TOPIC and m.recv > t_back + 1.0
                                  and abs(m.body["ts_ms"] / 1000 - m.recv) < 1.0, 60)
        t_end = settle(None if fixed is None else fixed.recv - t_back, t_back)
    stepped = {h: [m for m in recorder.select(DECISION_TOPIC, t0, t_back)
                   if round((m.body["ts_ms"] / 1000 - m.recv) / 3600) == h] for h in (1, -1)}
    ons = [m for m in recorder.select(RELAY_TOPIC, t0, t_end) if is_on(m)]

    def real_late(m: Any, stamp_ms: float) -> bool:
        """Later than TTL after the real capture (the stamp less the step it was made under)."""
        step = round((stamp_ms / 1000 - m.recv) / 3600) * 3600
        return m.recv - (stamp_ms / 1000 - step) > TTL_S

    decisions = recorder.select(DECISION_TOPIC, t0, t_end)
    return Row(
        "clock stepped +-1 h", str(len(ons)),
        str(sum(real_late(m, m.body["expires_at_ms"] - TTL_S * 1000) for m in ons)),
        f"{sum(real_late(m, m.body['ts_ms']) for m in decisions)}/{len(decisions)}",
        seconds(None if fixed is None else fixed.recv - t_back), str(audit_missing(daemon, audit)),
        f"libfaketime, wall clock only; late = by the real clock. As a consumer checking expires_at_ms with a "
        f"correct clock sees them: {sum(map(late, stepped[-1]))}/{len(stepped[-1])} decisions stamped -1 h look "
        f"expired (refused: fail closed), {sum(map(late, stepped[1]))}/{len(stepped[1])} stamped +1 h look "
        f"expired (they stay acceptable for another hour: a replay window); recovery = clock back -> first decision "
        f"stamped right",
    )


def kill_enrolment(door: Door, rng: random.Random, trials: int) -> Row:
    """`facedoor enroll` SIGKILLed at random moments on copies of the store: nothing or everything."""
    photos = train_photos(NEWCOMER)[:6]
    before = listing(door.models, door.store)
    full = door.work / "store-e-full.db"
    shutil.copy(door.store, full)
    t0 = time.monotonic()
    enroll(door.models, full, NEWCOMER, count=len(photos))
    duration = time.monotonic() - t0
    everything = (listing(door.models, full) or {}).get(NEWCOMER)
    outcomes: list[str] = []
    for i in range(trials):
        store = door.work / f"store-e-{i}.db"
        shutil.copy(door.store, store)
        proc = subprocess.Popen([str(FACEDOOR), "--models", str(door.models), "--store", str(store), "enroll",
                                 "--skip-bad", NEWCOMER, *photos], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(store) as db:
            intact = db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        now = listing(door.models, store)
        if not intact or now is None or any(now.get(k) != v for k, v in (before or {}).items()):
            outcomes.append("broken")
        else:
            outcomes.append({None: "nothing", everything: "everything"}.get(now.get(NEWCOMER), "partial"))
    lost = sum(o in ("broken", "partial") for o in outcomes)
    return Row("SIGKILL mid-enrolment", "-", "-", "-", "-", str(lost),
               f"{trials} kills at 30-100 % of a {duration:.1f} s enrolment of {len(photos)} photos: "
               f"{outcomes.count('nothing')} nothing, {outcomes.count('everything')} everything, "
               f"{outcomes.count('partial')} partial, {outcomes.count('broken')} broken store")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="random seed (stall moments, kill moments)")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLed enrolments (default 5)")
    parser.add_argument("--models", type=Path, default=None, help="models (default ./models, else the test cache)")
    args = parser.parse_args()
    logging.getLogger("facedoor.audit").setLevel(logging.ERROR)  # corrupt audit lines are counted, not logged per read
    models = find_models(args.models)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="facedoor-faults-"))
    broker = PrivateBroker(work / "mosquitto")
    t0 = time.monotonic()
    rows: list[Row] = []
    try:
        door = prepare_door(work, models)
        broker.start()
        scenarios: list[tuple[str, Callable[[], list[Row]]]] = [
            ("broker, disk", lambda: broker_and_disk_faults(door, broker, rng)),
            ("camera", lambda: [camera_fault(door, broker)]),
            ("store, model", lambda: store_and_model_faults(door, broker)),
            ("clock", lambda: [clock_fault(door, broker)]),
            ("enrolment", lambda: [kill_enrolment(door, rng, args.kills)]),
        ]
        with tqdm(scenarios, desc="fault scenarios", unit="scenario") as bar:
            for name, scenario in bar:
                bar.set_postfix_str(name)
                rows.extend(scenario())
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nfacedoor fault table: {door.person} at the door, TTL {TTL_S:g} s, ack_timeout_s 1, "
          f"relock {RELOCK_S:g} s, {time.monotonic() - t0:.0f} s in all")
    header = ("fault", "unlocks", "late unlocks [0]", "late decisions", "recovery", "data lost [0]")
    print("\n".join(format_table(header, [(r.fault, r.unlocks, r.late_unlocks, r.late_decisions, r.recovery,
                                             r.data_lost) for r in rows])))
    print("\nwhat each row measured:")
    print("\n".join(f"- {r.fault}: {r.note}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
