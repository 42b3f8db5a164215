"""`facedoor enroll | list | remove | verify | identify`: the embedding store from the command line.

Photos given on the command line are still images (any size, possibly a tight face crop), read
by `facedoor.images.read_image`; see `FacePipeline.detect_still` for how tight crops are handled.
Heavy modules (OpenCV, ONNX Runtime) load inside the handlers that need them.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from facedoor.cli import EXIT_ERROR, EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError

if TYPE_CHECKING:
    from facedoor.match import Gallery
    from facedoor.pipeline import Face


def _round(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


def _largest_face(ctx: CliContext, path: Path) -> tuple[Face, int]:
    """The largest face of the photo at PATH, encoded, and the number of faces; no face is bad input."""
    from facedoor.images import ImageError, read_image

    pipeline = ctx.pipeline()
    try:
        image, _ = read_image(path)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    faces = pipeline.detect_still(image)  # largest first
    if not faces:
        raise CliError(f"{path}: no face found")
    pipeline.encode(image, faces[:1])
    return faces[0], len(faces)


# -- enroll ---------------------------------------------------------------------------------

def _enroll(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.enrolment import embed_photos
    from facedoor.store import validate_name

    validate_name(args.name)

    def rejected(path: Path, reason: str) -> None:
        print(f"facedoor enroll: {'skipped' if args.skip_bad else 'rejected'} {path}: {reason}", file=sys.stderr)
        if ctx.json:
            ctx.emit({"image": str(path), "identity": args.name, "status": "rejected", "reason": reason}, "")

    photos = embed_photos(ctx.pipeline(), args.images, on_reject=rejected)
    if photos.rejected and not args.skip_bad:
        raise CliError(
            f"{len(photos.rejected)} of {len(args.images)} photo(s) rejected, nothing enrolled for {args.name!r} "
            "(fix or drop them, or pass --skip-bad to enrol the good ones)"
        )
    if not photos.paths:
        raise CliError(f"no usable photo for {args.name!r}, nothing enrolled")
    store = ctx.store(create=True)
    added = store.enroll(args.name, photos.matrix(), photos.hashes, replace=args.replace)
    for path in photos.paths:
        if ctx.json:
            ctx.emit({"image": str(path), "identity": args.name, "status": "enrolled"}, "")
    skipped = len(photos.rejected)
    ctx.emit(
        {"identity": args.name, "enrolled": len(photos.paths), "new": added, "rejected": skipped,
         "store": str(store.path)},
        f"enrolled {args.name}: {len(photos.paths)} photo(s), {added} new embedding(s)"
        + (f", {skipped} skipped" if skipped else "") + f" in {store.path}",
    )
    return EXIT_OK


# -- list / remove --------------------------------------------------------------------------

def _list(args: argparse.Namespace, ctx: CliContext) -> int:
    identities = ctx.store().identities()
    if not identities and not ctx.json:
        print(f"no one enrolled in {ctx.config.store}", file=sys.stderr)
    for ident in identities:
        note = f"  ({ident.stale} from another encoder: re-enrol with --replace)" if ident.stale else ""
        ctx.emit(
            {"identity": ident.name, "embeddings": ident.embeddings, "stale": ident.stale, "created": ident.created},
            f"{ident.name}\t{ident.embeddings} embedding(s)\tenrolled {ident.created}{note}",
        )
    return EXIT_OK


def _remove(args: argparse.Namespace, ctx: CliContext) -> int:
    removed = ctx.store().remove(args.name)
    ctx.emit({"identity": args.name, "removed": removed}, f"removed {args.name} ({removed} embedding(s))")
    return EXIT_OK


# -- verify / identify ----------------------------------------------------------------------

def _gallery(ctx: CliContext) -> Gallery:
    gallery = ctx.store().gallery(ctx.config.recognition.threshold)
    if len(gallery) == 0:
        raise CliError(f"no one enrolled in {ctx.config.store}: enrol with `facedoor enroll NAME IMAGE...`")
    return gallery


def _verify(args: argparse.Namespace, ctx: CliContext) -> int:
    gallery = _gallery(ctx)
    if args.name not in gallery.identities:
        raise CliError(f"no identity named {args.name!r} in {ctx.config.store} (see `facedoor list`)")
    face, _ = _largest_face(ctx, args.image)
    assert face.embedding is not None
    match = gallery.verify(args.name, face.embedding)
    ctx.emit(
        {"image": str(args.image), "identity": args.name, "distance": _round(match.distance),
         "threshold": match.threshold, "match": match.matched},
        f"{args.image}: {'MATCH' if match.matched else 'no match'} {args.name} "
        f"(distance {match.distance:.3f}, threshold {match.threshold:g})",
    )
    return EXIT_OK if match.matched else EXIT_NO_MATCH


def _identify(args: argparse.Namespace, ctx: CliContext) -> int:
    gallery = _gallery(ctx)
    failed = 0
    for path in args.images:
        try:
            face, count = _largest_face(ctx, path)
        except CliError as exc:
            failed += 1
            print(f"facedoor identify: error: {exc}", file=sys.stderr)
            continue
        assert face.embedding is not None
        match = gallery.identify(face.embedding)
        who = match.identity if match.matched else None
        ctx.emit(
            {"image": str(path), "faces": count, "identity": who, "distance": _round(match.distance),
             "threshold": match.threshold},
            f"{path}: {who or 'unknown'} (distance {match.distance:.3f}, threshold {match.threshold:g}, "
            f"{count} face(s))",
        )
    return EXIT_ERROR if failed else EXIT_OK


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register enroll, list, remove, verify and identify."""
    p = commands.add_parser(
        "enroll", parents=[REPORTING], help="enrol a person from one or more photos",
        description="Each photo must show exactly one usable face: at least 28 px, sharp enough, and no "
                    "second face at least half its size. Tight face crops (e.g. 96x96 ID photos) work: "
                    "when no face is found on a small photo it is retried padded and upscaled. "
                    "All photos are stored in one transaction, or none.",
    )
    p.add_argument("name", help="identity name (unique, up to 64 characters)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--skip-bad", action="store_true", help="enrol the usable photos, skipping rejected ones")
    p.add_argument("--replace", action="store_true",
                   help="replace NAME's existing embeddings (re-enrolment, e.g. after changing the encoder)")
    p.set_defaults(handler=_enroll)

    p = commands.add_parser("list", parents=[REPORTING], help="list enrolled identities")
    p.set_defaults(handler=_list)

    p = commands.add_parser("remove", parents=[REPORTING], help="remove an identity and all its embeddings")
    p.add_argument("name")
    p.set_defaults(handler=_remove)

    p = commands.add_parser(
        "verify", parents=[REPORTING], help="1:1: is the face in IMAGE this person? exit 0 match, 1 no match"
    )
    p.add_argument("name")
    p.add_argument("image", type=Path)
    p.set_defaults(handler=_verify)

    p = commands.add_parser(
        "identify", parents=[REPORTING], help="1:K: who is the (largest) face in each IMAGE?",
        description="Exit 0 when every image was processed (matched or not), 2 when any image was bad.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.set_defaults(handler=_identify)
