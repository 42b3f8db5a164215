"""The door's side of the site roster (facedoor.fleet): subscribe, verify, apply, say so.

A door subscribes to its site's entries and manifest over its own MQTT link. Each message is
verified and decrypted on arrival (a forged, altered, misplaced or oversized one is refused and
counted); a worker thread applies what arrived, newest (version, origin) per entry, to the
store **in one transaction** with the ledger, only where it is newer than what the store holds
(going backwards is refused, also across restarts). The store watcher then reloads the gallery.

No decision on an unknown roster: after start and after every (re)connect, `blocked(now)` names
a reason until the retained manifest has arrived on this connection and every entry it lists is
applied at (at least) its version. A manifest older than the one the store applied is refused
(a stale re-publish or a replay) and the door waits. Cut off from the broker, the door keeps its
last confirmed roster for `fleet.max_roster_age_s`, then is blocked too (it denies everyone).
With `fleet.anchor_doors` the same bound holds when the door's own broker is up but cut off from
the rest of the site (a bridge that is down): the roster counts as confirmed only while a fresh
record of an anchor door keeps arriving (a newer timestamp than that door's last one, so a
retained record re-delivered on reconnect is no proof).
`generation` counts applied changes, so the door can tell its gallery is behind the roster.

The door publishes its state retained and sealed on `<prefix>/site/<site>/door/<door_id>`:
the manifest version it applied, its ledger's digest, whether it is ready and why not.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from facedoor.config import FacedoorConfig
from facedoor.fleet import (
    COHORT_KEY,
    MANIFEST_KEY,
    NO_RANK,
    Rank,
    Refused,
    Sealed,
    SiteKeys,
    Topics,
    ledger_entries,
    manifest_entries,
    open_sealed,
    publish_changes,
    roster_digest,
    seal,
)
from facedoor.mqtt import MqttLink
from facedoor.store import EmbeddingStore, RosterRow, StoreError

log = logging.getLogger(__name__)

_CONNECT = object()  # queue marker: the link (re)connected; manifests before it no longer count


class RosterSync:
    """Keeps a door's store on its site's roster and says whether the door may decide."""

    def __init__(self, cfg: FacedoorConfig, link: MqttLink, encoder_sha256: str, keys: SiteKeys | None = None):
        assert cfg.fleet is not None
        self.cfg, self.fleet, self.link = cfg, cfg.fleet, link
        self.keys = keys or SiteKeys.load(cfg.fleet)  # ConfigError before anything starts
        self.topics = Topics(cfg)
        self.encoder_sha256 = encoder_sha256
        self.store = EmbeddingStore(cfg.store, encoder_sha256)  # a new door starts from an empty store
        self.generation = 0           # applied changes so far: the gallery must be reloaded past it
        self.refused: dict[str, int] = {}
        self.applied_ms: int | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._synced = False          # this connection's manifest arrived and is fully applied
        self._epoch = -1              # link.connects of the connection being synced
        self._synced_epoch = -2       # ... and of the one that was synced (the link counts before it says so)
        self._confirmed: float | None = None
        self._reason = "waiting for the site roster manifest"
        self._manifest: Sealed | None = None
        self._anchors = set(cfg.fleet.anchor_doors)
        self._anchor_ts: dict[str, int] = {}     # newest record timestamp of each anchor door
        self._anchor_heard = time.monotonic()    # last fresh anchor record; the start counts as one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="facedoor-roster", daemon=True)
        ledger = self.store.roster()
        self._ledger = ledger_entries(ledger)
        self._applied: Rank = (ledger[MANIFEST_KEY].version, ledger[MANIFEST_KEY].origin) \
            if MANIFEST_KEY in ledger else NO_RANK

    # -- wiring -------------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe (renewed on every reconnect) and start applying; call before `link.start()`."""
        self.link.subscribe(self.topics.manifest, self._on_manifest)  # first: it arrives before the entries
        self.link.subscribe(self.topics.entries, self._on_entry)
        if self._anchors:
            self.link.subscribe(self.topics.doors, self._on_door)
        self.link.add_on_connect(self._on_connect)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.store.close()

    # -- the gate -----------------------------------------------------------------------------
    def blocked(self, now: float) -> str | None:
        """Why the door must decide nothing now (None: it may): the roster is unknown on this
        connection, not fully applied, or, cut off from the broker, older than max_roster_age_s."""
        with self._lock:
            if self.link.connected:
                if not (self._synced and self._synced_epoch == self.link.connects):
                    return self._reason
                silent = now - self._anchor_heard
                if self._anchors and silent > self.fleet.max_roster_age_s:
                    return (f"no record from anchor door(s) {', '.join(sorted(self._anchors))} for {silent:.0f}s, "
                            f"over fleet.max_roster_age_s ({self.fleet.max_roster_age_s:g}s): the link to them "
                            "(a bridge?) is down; everyone is denied until one is heard")
                self._confirmed = now
                return None
            if self._confirmed is None:
                return f"broker unreachable and no roster confirmed since start ({self._reason})"
            age = now - self._confirmed
            if age > self.fleet.max_roster_age_s:
                return (f"broker unreachable: roster unconfirmed for {age:.0f}s, over fleet.max_roster_age_s "
                        f"({self.fleet.max_roster_age_s:g}s); everyone is denied until it is back")
            return None

    def ready(self, now: float) -> bool:
        return self.blocked(now) is None

    def health(self, now: float) -> dict[str, Any]:
        """The roster part of the door's health report."""
        reason = self.blocked(now)
        with self._lock:
            manifest = self._manifest
            return {
                "site": self.fleet.site,
                "ready": reason is None,
                "reason": reason,
                "manifest_version": self._applied[0],
                "entries": len(self._ledger),
                "drift": manifest is not None and manifest.meta.get("digest") != roster_digest(self._ledger),
                "roster_age_s": None if self._confirmed is None else round(now - self._confirmed, 1),
                "anchor_silent_s": round(now - self._anchor_heard, 1) if self._anchors else None,
                "refused": dict(self.refused),
            }

    def publish_local(self, names: list[str]) -> None:
        """Publish NAMES' entries as this door's store now has them (a door template), in the background."""
        def run() -> None:
            try:
                with EmbeddingStore(self.cfg.store, self.encoder_sha256, create=False) as store:
                    publish_changes(self.cfg, store, names)
            except Exception as exc:
                log.warning("roster: door template of %s not published (%s); `facedoor fleet publish` sends it",
                            ", ".join(names), exc, extra={"fields": {"event": "roster_publish_failed"}})
        threading.Thread(target=run, name="facedoor-roster-publish", daemon=True).start()

    # -- paho's thread: verify and queue ------------------------------------------------------
    def _on_connect(self) -> None:
        with self._lock:
            self._synced = False  # at once: nothing is decided on this connection before its manifest
            self._epoch = self.link.connects
            self._reason = "reconnected: waiting for the site roster manifest"
        self._queue.put(_CONNECT)

    def _on_entry(self, topic: str, payload: bytes) -> None:
        key = topic.rsplit("/", 1)[-1]
        if payload:
            self._verify(payload, "cohort" if key == COHORT_KEY else "person", key)

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        if payload:
            self._verify(payload, "manifest", MANIFEST_KEY)

    def _on_door(self, topic: str, payload: bytes) -> None:
        """An anchor door's record newer than its last one proves the path to it is up now."""
        door = topic.rsplit("/", 1)[-1]
        if door not in self._anchors or not payload:
            return
        try:
            record = open_sealed(self.keys, payload, "door", door)
        except Refused as exc:
            self._refuse(exc.reason, f"door record {door}: {exc}")
            return
        with self._lock:
            last = self._anchor_ts.get(door)
            self._anchor_ts[door] = max(record.ts_ms, last or record.ts_ms)
            if last is not None and record.ts_ms > last:
                self._anchor_heard = time.monotonic()

    def _verify(self, payload: bytes, kind: str, key: str) -> None:
        try:
            self._queue.put(open_sealed(self.keys, payload, kind, key))
        except Refused as exc:
            self._refuse(exc.reason, f"{kind} {key}: {exc}")

    def _refuse(self, reason: str, detail: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("roster: refused %s", detail, extra={"fields": {"event": "roster_refused", "reason": reason}})

    # -- the worker: apply in one transaction -------------------------------------------------
    def _work(self) -> None:
        heartbeat = self.cfg.mqtt.health_interval_s
        last_record = 0.0
        while not self._stop.is_set():
            try:
                batch = [self._queue.get(timeout=heartbeat)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                return
            try:
                changed = self._apply(batch)
            except Exception as exc:  # fail closed: the door waits, the next message tries again
                with self._lock:
                    self._synced = False
                    self._reason = f"roster not applied: {exc}"
                log.error("roster: applying failed: %s", exc, extra={"fields": {"event": "roster_apply_failed"}})
                changed = True
            if changed or time.monotonic() - last_record >= heartbeat:
                last_record = time.monotonic()
                self._publish_record()

    def _apply(self, batch: list[Any]) -> bool:
        """Apply the newest of each entry in BATCH that is newer than the ledger, then check the manifest."""
        newest: dict[str, Sealed] = {}
        manifest: Sealed | None = None
        reconnected = False
        for item in batch:
            if item is _CONNECT:
                manifest, reconnected = None, True
            elif item.kind == "manifest":
                manifest = item if manifest is None or item.rank > manifest.rank else manifest
            elif item.key not in newest or item.rank > newest[item.key].rank:
                newest[item.key] = item
        with self._lock:
            known = None if reconnected else self._manifest
        if manifest is not None and (known is None or manifest.rank >= known.rank):
            known = manifest
        try:
            floor = manifest_entries(known) if known is not None else {}
        except Refused:
            floor = {}
        ledger = self.store.roster()
        people: dict[str, tuple[np.ndarray, list[str]] | None] = {}
        cohort: tuple[list[str], np.ndarray] | None = None
        rows = []
        for key, entry in newest.items():
            held = (ledger[key].version, ledger[key].origin) if key in ledger else NO_RANK
            if entry.rank <= held:
                if entry.rank < held:
                    self._refuse("backwards", f"entry {key} v{entry.version} ({entry.origin}): "
                                 f"this door holds v{held[0]} ({held[1]})")
                continue
            if entry.rank < floor.get(key, NO_RANK):
                self._refuse("superseded", f"entry {key} v{entry.version} ({entry.origin}): the manifest lists "
                             f"v{floor[key][0]} ({floor[key][1]}); a replay of an old entry?")
                continue
            meta, removed = entry.meta, bool(entry.meta.get("removed"))
            if not removed and meta.get("encoder") != self.encoder_sha256:
                self._refuse("encoder", f"entry {key}: templates of encoder {str(meta.get('encoder'))[:12]}, "
                             f"this door runs {self.encoder_sha256[:12]}")
                continue
            name = str(meta.get("name", ""))
            if key == COHORT_KEY:
                cohort = ([], np.zeros((0, 1), np.float32)) if removed else \
                    ([str(x) for x in meta.get("labels", [])], entry.vectors)
                if cohort and len(cohort[0]) != len(cohort[1]):
                    raise StoreError(f"cohort entry v{entry.version}: labels and templates differ in number")
            else:
                people[name] = None if removed else (entry.vectors, [str(k) for k in meta.get("kinds", [])])
            rows.append(RosterRow(key, name, entry.version, entry.origin, entry.digest, removed))
        if rows:
            self.store.apply_roster(people, cohort, rows)
            self.applied_ms = int(time.time() * 1000)
            log.info("roster: applied %d entr%s", len(rows), "y" if len(rows) == 1 else "ies",
                     extra={"fields": {"event": "roster_applied", "entries": len(rows),
                                       "removed": sum(r.removed for r in rows)}})
        ledger = self.store.roster()
        held_entries = ledger_entries(ledger)
        with self._lock:
            if rows:
                self.generation += 1
            self._ledger = held_entries
            if reconnected:
                self._manifest = None
            if manifest is not None:
                if manifest.rank < self._applied:  # refused; a door current on this connection stays so
                    self.refused["backwards"] = self.refused.get("backwards", 0) + 1
                    if self._manifest is None:
                        self._reason = (f"the site manifest v{manifest.version} ({manifest.origin}) is older than "
                                        f"the v{self._applied[0]} this door applied (a stale re-publish or a "
                                        "replay): run `facedoor fleet publish` from an up-to-date door")
                else:
                    self._manifest = manifest
        current = self._manifest
        if current is None:
            return bool(rows) or reconnected
        try:
            listed = manifest_entries(current)
        except Refused as exc:
            self._refuse(exc.reason, f"manifest: {exc}")
            return True
        missing = [k for k, r in listed.items() if held_entries.get(k, NO_RANK) < r]
        if not missing and current.rank > self._applied:
            self.store.apply_roster({}, None, [RosterRow(MANIFEST_KEY, "", current.version, current.origin,
                                                         str(current.meta.get("digest")), False)])
        with self._lock:
            if self._manifest is not current:
                return True
            if missing:
                self._synced = False
                self._reason = (f"waiting for {len(missing)} roster entr{'y' if len(missing) == 1 else 'ies'} "
                                f"of manifest v{current.version}")
            else:
                was = self._synced
                self._applied = max(self._applied, current.rank)
                self._synced, self._synced_epoch = True, self._epoch
                if not was:
                    log.info("roster current: manifest v%d, %d entries", current.version, len(listed),
                             extra={"fields": {"event": "roster_ready", "manifest_version": current.version,
                                               "entries": len(listed)}})
        return True

    def _publish_record(self) -> None:
        """This door's roster state, retained and sealed, for `facedoor fleet status`."""
        now = time.monotonic()
        reason = self.blocked(now)
        with self._lock:
            meta = {"door": self.cfg.door_id, "ready": reason is None, "reason": reason,
                    "digest": roster_digest(self._ledger), "entries": len(self._ledger),
                    "applied_ms": self.applied_ms, "refused": dict(self.refused)}
            rank = self._applied
        self.link.publish(self.topics.door(self.cfg.door_id),
                          seal(self.keys, "door", self.cfg.door_id, rank, meta), retain=True)
