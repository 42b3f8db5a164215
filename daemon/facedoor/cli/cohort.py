"""`facedoor cohort [DIR] [--clear]`: store templates of people who are not members.

A cohort guards against look-alikes: the door unlocks only when a visit is nearer its member
than any cohort face by `policy.cohort_margin`. DIR holds one folder of photos per person (a
public face set such as LFW: thousands of people); photos directly in DIR are one person each.
Every photo passes the enrolment checks (one sharp face of enrolment size); a person's usable
photos make one template. The cohort replaces the stored one in one transaction, or nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facedoor.cli import EXIT_OK, REPORTING, CliContext, CliError
from facedoor.cli.fleet import publish_after

PHOTOS_PER_PERSON = 10  # usable photos kept per cohort person (a template steadies after a few)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def cohort_people(root: Path) -> dict[str, list[Path]]:
    """Label -> photo paths under ROOT: one folder per person; a photo directly in ROOT is one person."""
    if not root.is_dir():
        raise CliError(f"{root}: not a directory of face photos")
    people: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            photos = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if photos:
                people[entry.name] = photos
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            people[entry.stem] = [entry]
    return people


def _cohort(args: argparse.Namespace, ctx: CliContext) -> int:
    import numpy as np
    from tqdm import tqdm

    from facedoor.enrolment import embed_photos
    from facedoor.match import person_templates
    from facedoor.store import MAX_COHORT

    if args.clear and args.dir is not None:
        raise CliError("give DIR to build a cohort, or --clear to drop it, not both")
    if args.dir is None and not args.clear:
        store = ctx.store()
        stored = store.cohort()[0]
        ctx.emit({"cohort": len(stored), "store": str(store.path)},
                 f"cohort: {len(stored)} people in {store.path}"
                 + ("" if stored else " (none: build one with `facedoor cohort DIR`)"))
        return EXIT_OK
    if args.clear:
        store = ctx.store()
        dropped = len(store.cohort()[0])
        store.set_cohort([], np.zeros((0, 1), np.float32))
        publish_after(ctx, [], cohort=True)
        ctx.emit({"cohort": 0, "dropped": dropped}, f"cohort cleared ({dropped} people dropped) in {store.path}")
        return EXIT_OK
    people = cohort_people(args.dir)
    if not people:
        raise CliError(f"{args.dir}: no face photos (.jpg, .png, ...) found")
    if len(people) > MAX_COHORT:
        raise CliError(f"{args.dir}: {len(people)} people, a cohort holds at most {MAX_COHORT}")
    pipeline = ctx.pipeline()
    labels: list[str] = []
    rows: list[np.ndarray] = []
    rejected = 0
    for label, photos in tqdm(people.items(), desc="cohort", unit="person", file=sys.stderr, disable=ctx.json):
        usable = embed_photos(pipeline, photos, limit=PHOTOS_PER_PERSON)
        rejected += len(usable.rejected)
        labels += [label] * len(usable.embeddings)
        rows += usable.embeddings
    if not rows:
        raise CliError(f"{args.dir}: no usable face photo ({rejected} rejected); the cohort was left as it was")
    names, templates = person_templates(labels, np.stack(rows))
    store = ctx.store(create=True)
    store.set_cohort(names, templates)
    publish_after(ctx, [], cohort=True)
    gallery = store.gallery(ctx.config.recognition.threshold)
    for member in gallery.identities:
        row = gallery.names.index(member)
        d = np.linalg.norm(templates - gallery.embeddings[row], axis=1)
        nearest = int(np.argmin(d))
        if d[nearest] < gallery.threshold:
            print(f"facedoor cohort: warning: cohort person {names[nearest]!r} is {d[nearest]:.3f} from member "
                  f"{member!r}, within the threshold: {member}'s visits may be denied as look-alikes; "
                  f"if it is {member}, remove that folder and rerun",
                  file=sys.stderr)
    ctx.emit({"cohort": len(names), "photos": len(rows), "rejected": rejected, "store": str(store.path)},
             f"cohort: {len(names)} people from {len(rows)} photo(s) ({rejected} rejected) in {store.path}")
    return EXIT_OK


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register cohort."""
    p = commands.add_parser(
        "cohort", parents=[REPORTING], help="store faces of non-members that guard against look-alikes",
        description=__doc__.split("\n\n")[1].replace("\n", " ") if __doc__ else None,
    )
    p.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="one folder of photos per person")
    p.add_argument("--clear", action="store_true", help="drop the stored cohort")
    p.set_defaults(handler=_cohort)
