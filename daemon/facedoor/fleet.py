"""Several doors, one membership: the site roster, sealed and versioned, on the MQTT broker.

Every enrolment, removal, cohort and door template is published as a **retained roster entry**
per person on `<prefix>/site/<site>/entry/<key>` (KEY: an HMAC of the name, so names never
appear in topics), and a **manifest** on `<prefix>/site/<site>/manifest` lists every entry's
(version, origin) and a digest of that list. Each message is

    b"FDR1" | header length (2 bytes, big-endian) | header (canonical JSON) | nonce (12) | AES-GCM ciphertext

The header (kind, site, key, version, origin, ts_ms) is the AES-GCM associated data, so it is
authenticated; the plaintext (the name, the templates as float32, the encoder's SHA-256) is
encrypted. Both AES-GCM keys come from the site key file by HKDF-SHA256 with the site name in
`info`: biometric data never crosses the broker in clear, a message sealed for another site or
another entry does not open here, and anything altered fails authentication.

A person's entry carries what a door decides on: the enrolment template (the one enrolment
embedding, or the normalised mean of several, exactly as the gallery builds it) and the door
templates. A removal is a tombstone: the same entry, `removed`, with a higher version. Versions
are integers per entry; ties between doors that published at once resolve by
(version, origin door id), compared lexicographically, the same everywhere. A store's `roster`
ledger records which version of each entry it holds (and of the manifest), so a door refuses
anything that goes backwards, also after a restart. The door side is facedoor.fleet_sync.

`publish_changes(cfg, store, names)` is the one publishing function (CLI and web console): it
records the new versions in the store's ledger first, then publishes the entries, then the
manifest (re-read and merged again when another publisher overwrote it at the same moment).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from facedoor.config import FacedoorConfig, FleetConfig
from facedoor.match import person_templates
from facedoor.signing import load_key
from facedoor.store import DOOR, ENROLMENT, EmbeddingStore, RosterRow, StoreError

log = logging.getLogger(__name__)

MAGIC = b"FDR1"
NONCE_BYTES = 12
MAX_HEADER_BYTES = 1024
MAX_MESSAGE_BYTES = 16 * 2**20  # a cohort of ~30,000 at 128-D; anything larger is refused unread
COHORT_KEY, MANIFEST_KEY = "cohort", "manifest"
KINDS = ("person", "cohort", "manifest", "door")
MANIFEST_TRIES = 5  # re-merges when concurrent publishers overwrite each other's manifest
Rank = tuple[int, str]  # (version, origin door id): compared lexicographically
NO_RANK: Rank = (0, "")


class FleetError(RuntimeError):
    """The site roster could not be read or published (broker unreachable, stalled, refused)."""


class Refused(ValueError):
    """A roster message that cannot be verified or does not belong here; `reason` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


@dataclass(frozen=True)
class SiteKeys:
    """The keys of one site, derived from its key file: AES-GCM sealing and entry ids."""

    site: str
    seal_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)

    @classmethod
    def load(cls, fleet: FleetConfig) -> SiteKeys:
        """Read `fleet.key_file` (>= 32 bytes, owner-only, else a ConfigError) and derive the keys."""
        return cls.derive(fleet.site, load_key(fleet.key_file, "fleet.key_file"))

    @classmethod
    def derive(cls, site: str, key: bytes) -> SiteKeys:
        material = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"facedoor-roster-v1",
                        info=b"site " + site.encode()).derive(key)
        return cls(site, material[:32], material[32:])

    def person_key(self, name: str) -> str:
        """The entry key of NAME: 128 bits of HMAC-SHA256, so the topic does not name the person."""
        return hmac.new(self.id_key, b"person\0" + name.encode(), hashlib.sha256).hexdigest()[:32]


class Topics:
    """The site's topics under `<topic_prefix>/site/<site>/`."""

    def __init__(self, cfg: FacedoorConfig):
        assert cfg.fleet is not None
        self.base = f"{cfg.mqtt.topic_prefix}/site/{cfg.fleet.site}"
        self.entries = f"{self.base}/entry/+"
        self.manifest = f"{self.base}/manifest"
        self.doors = f"{self.base}/door/+"

    def entry(self, key: str) -> str:
        return f"{self.base}/entry/{key}"

    def door(self, door_id: str) -> str:
        return f"{self.base}/door/{door_id}"


@dataclass(frozen=True)
class Sealed:
    """A verified roster message: its authenticated header, decrypted metadata and vectors."""

    kind: str
    key: str
    version: int
    origin: str
    ts_ms: int
    meta: dict[str, Any]
    vectors: np.ndarray
    digest: str  # SHA-256 of the plaintext: the content, independent of the nonce

    @property
    def rank(self) -> Rank:
        return (self.version, self.origin)


def _plaintext(meta: Mapping[str, Any], vectors: np.ndarray | None) -> bytes:
    body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    blob = b"" if vectors is None else np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    return len(body).to_bytes(4, "big") + body + blob


def content_digest(meta: Mapping[str, Any], vectors: np.ndarray | None) -> str:
    """The digest of an entry's content (what the ledger compares to spot a change)."""
    return hashlib.sha256(_plaintext(meta, vectors)).hexdigest()


def seal(keys: SiteKeys, kind: str, key: str, rank: Rank, meta: Mapping[str, Any],
         vectors: np.ndarray | None = None) -> bytes:
    """One roster message: the header authenticated, META and VECTORS (float32) encrypted."""
    header = json.dumps({"kind": kind, "site": keys.site, "key": key, "version": rank[0], "origin": rank[1],
                         "ts_ms": int(time.time() * 1000)}, sort_keys=True, separators=(",", ":")).encode()
    aad = MAGIC + len(header).to_bytes(2, "big") + header
    nonce = secrets.token_bytes(NONCE_BYTES)
    return aad + nonce + AESGCM(keys.seal_key).encrypt(nonce, _plaintext(meta, vectors), aad)


def open_sealed(keys: SiteKeys, payload: bytes, kind: str, key: str | None = None) -> Sealed:
    """Verify and decrypt PAYLOAD, expected to be a KIND message (for entry KEY); Refused otherwise.

    Reasons: too-large, malformed, forged (authentication failed: wrong key, altered, or not
    facedoor's), wrong-site, wrong-kind, wrong-key.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Refused("too-large", f"{len(payload)} bytes")
    if len(payload) < len(MAGIC) + 2 or not payload.startswith(MAGIC):
        raise Refused("malformed", "not a facedoor roster message")
    size = int.from_bytes(payload[4:6], "big")
    if size > MAX_HEADER_BYTES or len(payload) < 6 + size + NONCE_BYTES + 16:
        raise Refused("malformed", "truncated")
    end = 6 + size
    aad, nonce, ciphertext = payload[:end], payload[end:end + NONCE_BYTES], payload[end + NONCE_BYTES:]
    try:
        plain = AESGCM(keys.seal_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise Refused("forged", "authentication failed (another site key, or altered)") from None
    try:
        header = json.loads(aad[6:])
        body_len = int.from_bytes(plain[:4], "big")
        meta = json.loads(plain[4:4 + body_len])
        version, origin = header["version"], header["origin"]
        if not (isinstance(version, int) and version >= 0 and isinstance(origin, str) and isinstance(meta, dict)):
            raise ValueError("bad header")
        dim = int(meta.get("dim", 0))
        blob = plain[4 + body_len:]
        if (dim and len(blob) % (4 * dim)) or (not dim and blob):
            raise ValueError("vectors do not fill whole rows")
        vectors = np.frombuffer(blob, dtype="<f4").reshape(-1, dim) if dim else np.zeros((0, 0), np.float32)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise Refused("malformed", str(exc)[:80]) from None
    if header.get("site") != keys.site:
        raise Refused("wrong-site", str(header.get("site"))[:64])
    if header.get("kind") != kind:
        raise Refused("wrong-kind", f"{header.get('kind')!r} where {kind!r} belongs")
    if key is not None and header.get("key") != key:
        raise Refused("wrong-key", "sealed for another entry (moved or replayed onto this topic)")
    return Sealed(kind, str(header["key"]), version, origin, int(header.get("ts_ms", 0)), meta,
                  vectors.astype(np.float32), hashlib.sha256(plain).hexdigest())


def roster_digest(entries: Mapping[str, Rank]) -> str:
    """The digest of a roster: SHA-256 over its sorted `key version origin` lines."""
    lines = "\n".join(f"{k} {v} {o}" for k, (v, o) in sorted(entries.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def manifest_entries(manifest: Sealed) -> dict[str, Rank]:
    """The (version, origin) of each entry a verified manifest lists; Refused when malformed."""
    raw = manifest.meta.get("entries")
    if not isinstance(raw, dict):
        raise Refused("malformed", "manifest without entries")
    out: dict[str, Rank] = {}
    for key, rank in raw.items():
        if not (isinstance(rank, list) and len(rank) == 2 and isinstance(rank[0], int) and isinstance(rank[1], str)):
            raise Refused("malformed", f"manifest rank of {key!r}")
        out[key] = (rank[0], rank[1])
    if manifest.meta.get("digest") != roster_digest(out):
        raise Refused("malformed", "manifest digest does not match its entries")
    return out


def ledger_entries(ledger: Mapping[str, RosterRow]) -> dict[str, Rank]:
    """The (version, origin) of each roster entry a store's ledger holds (the manifest row aside)."""
    return {k: (r.version, r.origin) for k, r in ledger.items() if k != MANIFEST_KEY}


# -- the content of an entry, from a store ------------------------------------------------------

def person_content(store: EmbeddingStore, name: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """NAME's roster content: the enrolment template and the door templates, or a tombstone."""
    got = store.person(name)
    if got is None:
        return {"name": name, "removed": True}, None
    matrix, kinds = got
    enrol = matrix[[k == ENROLMENT for k in kinds]]
    door = matrix[[k == DOOR for k in kinds]]
    if not len(enrol):
        raise StoreError(f"identity {name!r} in {store.path} has no enrolment embedding to publish")
    template = enrol if len(enrol) == 1 else person_templates([name] * len(enrol), enrol)[1]
    rows = np.concatenate([template, door]).astype(np.float32)
    return ({"name": name, "removed": False, "encoder": store.encoder_sha256, "dim": int(rows.shape[1]),
             "kinds": [ENROLMENT] + [DOOR] * len(door)}, rows)


def cohort_content(store: EmbeddingStore) -> tuple[dict[str, Any], np.ndarray | None]:
    """The cohort's roster content (an empty cohort is a removed entry)."""
    labels, rows = store.cohort()
    if not labels:
        return {"name": "", "removed": True}, None
    return {"name": "", "removed": False, "encoder": store.encoder_sha256, "dim": int(rows.shape[1]),
            "labels": labels}, rows


# -- publishing ---------------------------------------------------------------------------------

class _Bus:
    """A short MQTT session of a publisher: read the retained roster, publish, read it back."""

    def __init__(self, cfg: FacedoorConfig, timeout_s: float):
        from facedoor.mqtt import create_client

        self.timeout_s = timeout_s
        self.client_id = f"facedoor-{cfg.door_id}-fleet-{os.getpid()}-{secrets.token_hex(3)}"
        self.barrier_topic = f"{Topics(cfg).base}/barrier/{self.client_id}"
        self.client = create_client(cfg, self.client_id)
        self._cond = threading.Condition()
        self._retained: dict[str, bytes] = {}
        self._barrier: bytes | None = None
        self._connected = threading.Event()
        self.client.on_connect = lambda c, u, f, reason, p: None if reason.is_failure else self._connected.set()
        self.client.on_message = self._on_message
        m = cfg.mqtt
        self.where = f"{m.host}:{m.port}"
        try:
            self.client.connect(m.host, m.port, keepalive=m.keepalive_s)
        except OSError as exc:
            raise FleetError(f"MQTT broker {self.where} unreachable ({exc})") from None
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise FleetError(f"MQTT broker {self.where} did not accept the connection within {timeout_s:g}s")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            if msg.topic == self.barrier_topic:
                self._barrier = bytes(msg.payload)
            elif msg.retain:
                self._retained[msg.topic] = bytes(msg.payload)
            self._cond.notify_all()

    def read(self, filters: Sequence[str]) -> dict[str, bytes]:
        """The retained messages on FILTERS now: subscribe, then wait for our own barrier message
        behind them (the broker sends retained messages of a subscription before later traffic)."""
        token = secrets.token_bytes(8)
        with self._cond:
            self._retained, self._barrier = {}, None
        self.client.subscribe([(f, 1) for f in (*filters, self.barrier_topic)])
        self.client.publish(self.barrier_topic, token, qos=1)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._barrier != token:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"MQTT broker {self.where} did not answer within {self.timeout_s:g}s")
                self._cond.wait(left)
            return dict(self._retained)

    def publish(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Publish ITEMS retained QoS 1 and wait for every PUBACK; FleetError otherwise."""
        infos = [self.client.publish(topic, payload, qos=1, retain=True) for topic, payload in items]
        deadline = time.monotonic() + self.timeout_s
        for info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                raise FleetError(f"publish to {self.where} failed: {exc}") from None
            if not info.is_published():
                raise FleetError(f"MQTT broker {self.where} did not acknowledge the roster within {self.timeout_s:g}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> _Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PublishReport:
    """What `publish_changes` published: entry versions by name ('' is the cohort), the manifest."""

    site: str
    entries: dict[str, Rank]
    manifest: Rank
    restored: bool  # the broker had no manifest: everything this store knows was published again
    seconds: dict[str, float]  # per step: connect_s, read_s, entries_s, manifest_s (a slow publish says where)
    manifest_tries: int

    def timing(self) -> str:
        """`0.12 s: connect 0.01, read 0.03, entries 0.02, manifest 0.06 (1 try)`."""
        steps = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in self.seconds.items())
        tries = f"{self.manifest_tries} tr{'y' if self.manifest_tries == 1 else 'ies'}"
        return f"{sum(self.seconds.values()):.2f} s: {steps} ({tries})"


def _verified(keys: SiteKeys, payload: bytes | None, kind: str, key: str | None = None) -> Sealed | None:
    if payload is None or not payload:
        return None
    try:
        return open_sealed(keys, payload, kind, key)
    except Refused as exc:
        log.warning("ignoring an unverifiable retained %s on the broker (%s)", kind, exc,
                    extra={"fields": {"event": "roster_refused", "reason": exc.reason, "kind": kind}})
        return None


def publish_changes(cfg: FacedoorConfig, store: EmbeddingStore, names: Sequence[str], *, cohort: bool = False,
                    everything: bool = False) -> PublishReport | None:
    """Publish the roster entries of NAMES (and the cohort) as they now are in STORE, then the
    manifest; None when no `fleet` is configured. A name no longer in STORE is published as a
    tombstone. EVERYTHING (`facedoor fleet publish`) publishes every person, removal and cohort
    STORE knows; so does any publish that finds no manifest on the broker (restarted without
    persistence). Raises FleetError (the broker) or ConfigError (the key); the store has then
    recorded the new versions, and the next publish sends them."""
    if cfg.fleet is None:
        return None
    keys, topics = SiteKeys.load(cfg.fleet), Topics(cfg)
    started = time.monotonic()
    phases: dict[str, float] = {}
    with _Bus(cfg, cfg.fleet.publish_timeout_s) as bus:
        phases["connect_s"] = time.monotonic() - started
        filters = [topics.entries] if everything else \
            [topics.entry(keys.person_key(n)) for n in names] + ([topics.entry(COHORT_KEY)] if cohort else [])
        retained = bus.read([topics.manifest, *filters])
        phases["read_s"] = time.monotonic() - started - sum(phases.values())
        manifest = _verified(keys, retained.pop(topics.manifest, None), "manifest", MANIFEST_KEY)
        listed = manifest_entries(manifest) if manifest is not None else {}
        on_broker = {s.key: s.rank for t, p in retained.items()
                     if (s := _verified(keys, p, "cohort" if t == topics.entry(COHORT_KEY) else "person",
                                        t.rsplit("/", 1)[-1])) is not None}
        ledger = store.roster()
        restored = manifest is None and bool(ledger)
        wanted = dict.fromkeys(names)
        if everything or restored:
            wanted.update(dict.fromkeys(i.name for i in store.identities()))
            wanted.update(dict.fromkeys(r.name for k, r in ledger.items() if k not in (COHORT_KEY, MANIFEST_KEY)))
            cohort = cohort or COHORT_KEY in ledger or bool(store.cohort()[0])
        contents = {(keys.person_key(n), n): person_content(store, n) for n in wanted}
        if cohort:
            contents[(COHORT_KEY, "")] = cohort_content(store)
        rows, messages, published = [], [], {}
        for (key, name), (meta, vectors) in contents.items():
            digest = content_digest(meta, vectors)
            mine = ledger.get(key)
            seen = max((mine.version, mine.origin) if mine else NO_RANK, on_broker.get(key, NO_RANK),
                       listed.get(key, NO_RANK))
            rank = seen if mine and mine.digest == digest and (mine.version, mine.origin) == seen \
                else (seen[0] + 1, cfg.door_id)
            rows.append(RosterRow(key, name, rank[0], rank[1], digest, bool(meta["removed"])))
            messages.append((topics.entry(key), seal(keys, "cohort" if key == COHORT_KEY else "person", key,
                                                     rank, meta, vectors)))
            published[name] = rank
        store.apply_roster({}, None, rows)  # ledger first: a publish that fails is re-sent by the next one
        bus.publish(messages)
        phases["entries_s"] = time.monotonic() - started - sum(phases.values())
        held = {**ledger_entries(ledger), **{r.key: (r.version, r.origin) for r in rows}}
        known = max(manifest.rank if manifest else NO_RANK,
                    (ledger[MANIFEST_KEY].version, ledger[MANIFEST_KEY].origin) if MANIFEST_KEY in ledger else NO_RANK)
        tries = 0
        for _ in range(MANIFEST_TRIES):
            tries += 1
            merged = dict(listed)
            for key, rank in held.items():
                merged[key] = max(rank, merged.get(key, NO_RANK))
            mrank: Rank = (known[0] + 1, cfg.door_id)
            digest = roster_digest(merged)
            bus.publish([(topics.manifest, seal(keys, "manifest", MANIFEST_KEY, mrank,
                                                {"entries": {k: list(r) for k, r in merged.items()},
                                                 "digest": digest}))])
            current = _verified(keys, bus.read([topics.manifest]).get(topics.manifest), "manifest", MANIFEST_KEY)
            if current is None:
                raise FleetError("the broker does not keep the roster manifest (retained messages refused?)")
            now_listed = manifest_entries(current)
            if all(now_listed.get(k, NO_RANK) >= r for k, r in held.items()):
                break  # ours, or a concurrent publisher's that already includes ours
            listed, known = now_listed, current.rank
        else:
            raise FleetError(f"the roster manifest kept being overwritten ({MANIFEST_TRIES} tries); "
                             "run `facedoor fleet publish` again")
        store.apply_roster({}, None, [RosterRow(MANIFEST_KEY, "", mrank[0], mrank[1], digest, False)])
        phases["manifest_s"] = time.monotonic() - started - sum(phases.values())
    log.info("roster published: %d entr%s, manifest v%d", len(rows), "y" if len(rows) == 1 else "ies", mrank[0],
             extra={"fields": {"event": "roster_published", "site": cfg.fleet.site, "entries": len(rows),
                               "manifest_version": mrank[0], "restored": restored, "manifest_tries": tries,
                               **{k: round(v, 3) for k, v in phases.items()}}})
    return PublishReport(cfg.fleet.site, published, mrank, restored, phases, tries)


def read_site(cfg: FacedoorConfig) -> tuple[Sealed | None, dict[str, Sealed], list[str]]:
    """The site's verified retained manifest and door records (by door id), and the refusals seen."""
    assert cfg.fleet is not None
    keys, topics = SiteKeys.load(cfg.fleet), Topics(cfg)
    refused: list[str] = []
    with _Bus(cfg, cfg.fleet.publish_timeout_s) as bus:
        retained = bus.read([topics.manifest, topics.doors])
    manifest = None
    doors: dict[str, Sealed] = {}
    for topic, payload in retained.items():
        leaf = topic.rsplit("/", 1)[-1]
        try:
            if topic == topics.manifest:
                manifest = open_sealed(keys, payload, "manifest", MANIFEST_KEY)
            elif payload:
                doors[leaf] = open_sealed(keys, payload, "door", leaf)
        except Refused as exc:
            refused.append(f"{topic}: {exc}")
    return manifest, doors, refused
