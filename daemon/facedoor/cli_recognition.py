"""The recognition subcommands of `facedoor`: enroll, list, remove, verify, identify.

Photos given on the command line are still images (any size, possibly a tight face crop), read
with OpenCV; see `FacePipeline.detect_still` for how tight crops are handled.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facedoor.cli import EXIT_ERROR, EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError

if TYPE_CHECKING:
    from facedoor.pipeline import Face


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """Decode PATH with OpenCV into a BGR image; return it with the file's SHA-256."""
    import cv2

    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, expected an image file") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise CliError(f"{path}: not a readable image (expected JPEG, PNG, BMP, WebP, TIFF...)")
    return image, hashlib.sha256(data).hexdigest()


def _round(x: float) -> float | None:
    return round(x, 4) if np.isfinite(x) else None


def _largest_face(ctx: CliContext, path: Path, image: np.ndarray) -> tuple["Face", int]:
    """The largest face of a still photo, encoded, and the number of faces; no face is bad input."""
    pipeline = ctx.pipeline()
    faces = pipeline.detect_still(image)
    if not faces:
        raise CliError(f"{path}: no face found")
    pipeline.encode(image, faces[:1])
    return faces[0], len(faces)


# -- enroll ---------------------------------------------------------------------------------

def _enroll(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.pipeline import PhotoRejected
    from facedoor.store import validate_name

    validate_name(args.name)
    pipeline = ctx.pipeline()
    accepted: list[tuple[Path, np.ndarray, str]] = []
    rejected = 0
    for path in args.images:
        try:
            image, sha = read_image(path)
            face = pipeline.enrolment_face(image)
        except (CliError, PhotoRejected) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            rejected += 1
            print(f"facedoor enroll: {'skipped' if args.skip_bad else 'rejected'} {path}: {reason}", file=sys.stderr)
            if ctx.json:
                ctx.emit({"image": str(path), "identity": args.name, "status": "rejected", "reason": reason}, "")
            continue
        accepted.append((path, face.embedding, sha))
    if rejected and not args.skip_bad:
        raise CliError(
            f"{rejected} of {len(args.images)} photo(s) rejected, nothing enrolled for {args.name!r} "
            "(fix or drop them, or pass --skip-bad to enrol the good ones)"
        )
    if not accepted:
        raise CliError(f"no usable photo for {args.name!r}, nothing enrolled")
    store = ctx.store(create=True)
    added = store.enroll(
        args.name, np.stack([e for _, e, _ in accepted]), [s for _, _, s in accepted], replace=args.replace
    )
    for path, _, _ in accepted:
        if ctx.json:
            ctx.emit({"image": str(path), "identity": args.name, "status": "enrolled"}, "")
    ctx.emit(
        {"identity": args.name, "enrolled": len(accepted), "new": added, "rejected": rejected, "store": str(store.path)},
        f"enrolled {args.name}: {len(accepted)} photo(s), {added} new embedding(s)"
        + (f", {rejected} skipped" if rejected else "") + f" in {store.path}",
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

def _gallery(ctx: CliContext):
    gallery = ctx.store().gallery(ctx.config.recognition.threshold)
    if len(gallery) == 0:
        raise CliError(f"no one enrolled in {ctx.config.store}: enrol with `facedoor enroll NAME IMAGE...`")
    return gallery


def _verify(args: argparse.Namespace, ctx: CliContext) -> int:
    gallery = _gallery(ctx)
    if args.name not in gallery.identities:
        raise CliError(f"no identity named {args.name!r} in {ctx.config.store} (see `facedoor list`)")
    image, _ = read_image(args.image)
    face, _ = _largest_face(ctx, args.image, image)
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
            image, _ = read_image(path)
            face, count = _largest_face(ctx, path, image)
        except CliError as exc:
            failed += 1
            print(f"facedoor identify: error: {exc}", file=sys.stderr)
            continue
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
