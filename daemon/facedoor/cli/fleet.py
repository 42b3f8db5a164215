"""`facedoor fleet status | publish | agent`: several doors sharing one site roster (facedoor.fleet).

`status` lists every door of the site from the retained, sealed door records: the manifest
version it applied, how old its record is, whether it may decide, and whether its roster differs
from the site manifest (drift; exit 1 when any door drifts or is blocked). `publish` publishes
everything this door's store holds (after a broker restart without persistence lost the
retained roster). `agent` is a door without a camera: it keeps a store on the site roster and
reports like a door (for a spare store, or the benchmark). `publish_after` is the hook that
enroll, remove and cohort call after writing the store.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from facedoor.cli import EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError


def _require_fleet(ctx: CliContext) -> None:
    if ctx.config.fleet is None:
        raise CliError("no `fleet` section in the configuration (fleet.site and fleet.key_file): "
                       "this door is not part of a site")


def publish_after(ctx: CliContext, names: Sequence[str], *, cohort: bool = False) -> None:
    """After a store write: publish NAMES (and the cohort) to the site roster; nothing without a
    fleet. A failure is a CliError (exit 2) that says the other doors do not know yet."""
    if ctx.config.fleet is None:
        return
    from facedoor.fleet import FleetError, publish_changes

    try:
        report = publish_changes(ctx.config, ctx.store(), names, cohort=cohort)
    except FleetError as exc:
        raise CliError(f"stored in {ctx.config.store}, but NOT published to site {ctx.config.fleet.site}: "
                       f"{exc}; the other doors do not know yet: run `facedoor fleet publish` when the broker "
                       "is back") from None
    assert report is not None
    print(f"facedoor: published to site {report.site} (manifest v{report.manifest[0]}"
          f"{', the whole roster restored' if report.restored else ''}) in {report.timing()}", file=sys.stderr)


def _status(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.fleet import FleetError, manifest_entries, read_site

    _require_fleet(ctx)
    assert ctx.config.fleet is not None
    try:
        manifest, doors, refused = read_site(ctx.config)
    except FleetError as exc:
        raise CliError(str(exc)) from None
    for line in refused:
        print(f"facedoor fleet status: refused {line}", file=sys.stderr)
    site = ctx.config.fleet.site
    if manifest is None:
        ctx.emit({"site": site, "manifest": None},
                 f"site {site}: no roster manifest on the broker (run `facedoor fleet publish` from a current door)")
    else:
        ctx.emit({"site": site, "manifest": manifest.version, "origin": manifest.origin,
                  "entries": len(manifest_entries(manifest)), "digest": manifest.meta.get("digest")},
                 f"site {site}: manifest v{manifest.version} ({manifest.origin}), "
                 f"{len(manifest_entries(manifest))} entries")
    now_ms = time.time() * 1000
    bad = manifest is None
    if not ctx.json and doors:
        print(f"{'door':<20} {'applied':>8} {'age_s':>8} {'ready':<6} {'drift':<6} note")
    for door_id, record in sorted(doors.items()):
        drift = manifest is None or record.meta.get("digest") != manifest.meta.get("digest")
        ready = bool(record.meta.get("ready"))
        age = round(max(0.0, now_ms - record.ts_ms) / 1000, 1)
        bad = bad or drift or not ready
        note = record.meta.get("reason") or ""
        ctx.emit({"door": door_id, "applied": record.version, "origin": record.origin, "age_s": age,
                  "ready": ready, "drift": drift, "entries": record.meta.get("entries"), "reason": note or None,
                  "refused": record.meta.get("refused")},
                 f"{door_id:<20} {'v' + str(record.version):>8} {age:>8} {'yes' if ready else 'NO':<6} "
                 f"{'DRIFT' if drift else 'no':<6} {note}")
    return EXIT_NO_MATCH if bad or not doors else EXIT_OK


def _publish(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.fleet import FleetError, publish_changes

    _require_fleet(ctx)
    try:
        report = publish_changes(ctx.config, ctx.store(), [], everything=True)
    except FleetError as exc:
        raise CliError(f"not published: {exc}") from None
    assert report is not None
    ctx.emit({"site": report.site, "entries": len(report.entries), "manifest": report.manifest[0]},
             f"published {len(report.entries)} roster entries to site {report.site}, manifest v{report.manifest[0]}")
    return EXIT_OK


def _agent(args: argparse.Namespace, ctx: CliContext) -> int:
    import signal
    import threading

    from facedoor.fleet_sync import RosterSync
    from facedoor.logs import setup_logging
    from facedoor.mqtt import MqttLink

    _require_fleet(ctx)
    cfg = ctx.config
    setup_logging(cfg.logging.level, cfg.logging.format)
    link = MqttLink(cfg)
    roster = RosterSync(cfg, link, ctx.encoder_sha256())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    roster.start()
    link.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        link.stop()
        roster.close()
    return EXIT_OK


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor fleet status | publish | agent`."""
    parser = commands.add_parser("fleet", help="several doors, one site roster: status, publish, agent",
                                 description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None)
    sub = parser.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    p = sub.add_parser("status", parents=[REPORTING],
                       help="every door's applied roster version, age and drift (exit 1 on drift)")
    p.set_defaults(handler=_status)
    p = sub.add_parser("publish", parents=[REPORTING],
                       help="publish this door's whole roster (after the broker lost it)")
    p.set_defaults(handler=_publish)
    p = sub.add_parser("agent", help="a roster-only door without a camera: keeps the store on the site roster")
    p.set_defaults(handler=_agent)
