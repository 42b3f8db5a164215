"""`facedoor enroll | list | remove | verify | identify`: the embedding store from the command line.

Photos given on the command line are still images (any size, possibly a tight face crop), read
by `facedoor.images.read_image`; see `FacePipeline.detect_still` for how tight crops are handled.
Heavy modules (OpenCV, ONNX Runtime) load inside the handlers that need them.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from facedoor.cli import EXIT_ERROR, EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError
from facedoor.cli.fleet import publish_after
from facedoor.formatting import distance

if TYPE_CHECKING:
    import numpy as np

    from facedoor.match import Gallery
    from facedoor.pipeline import Face, FacePipeline

T = TypeVar("T")
R = TypeVar("R")


READ_AHEAD = 2  # photos decoded while the current one is encoded: overlap without holding many decoded photos


def _faces(pipeline: FacePipeline, path: Path, image: np.ndarray) -> list[Face]:
    """The faces of the photo at PATH, decoded as IMAGE, largest first; no face is bad input."""
    faces = pipeline.detect_still(image)
    if not faces:
        raise CliError(f"{path}: no face found")
    return faces


def _largest_face(ctx: CliContext, path: Path) -> tuple[Face, int]:
    """The largest face of the photo at PATH, encoded, and the number of faces."""
    from facedoor.images import ImageError, read_image

    pipeline = ctx.pipeline()
    try:
        image, _ = read_image(path)
    except ImageError as exc:
        raise CliError(str(exc)) from None
    faces = _faces(pipeline, path, image)
    pipeline.encode(image, faces[:1])
    return faces[0], len(faces)


def _ahead(items: Iterable[T], work: Callable[[T], R], ahead: int, name: str) -> Iterator[tuple[T, R]]:
    """Each of ITEMS with WORK's result for it, in order, WORK running in a pool of AHEAD threads on the
    next AHEAD items while the caller handles this one (inline when AHEAD is 0); at most AHEAD + 1
    results are held. WORK's exceptions reach the caller with its item's turn."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    if ahead == 0:
        yield from ((item, work(item)) for item in items)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix=name) as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) > ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _decoded(paths: list[Path]) -> Iterator[tuple[Path, np.ndarray | CliError]]:
    """Each of PATHS with its decoded image (or the error that refused it), in order, decoded READ_AHEAD
    photos ahead (OpenCV's decoder releases the GIL, so decoding the next photos overlaps the work on
    this one)."""
    from facedoor.images import ImageError, decode_image

    def read(path: Path) -> np.ndarray | CliError:
        try:
            return decode_image(path)
        except ImageError as exc:
            return CliError(str(exc))

    return _ahead(paths, read, READ_AHEAD, "decode")


def _detected(ctx: CliContext, paths: list[Path]) -> Iterator[tuple[Path, tuple[np.ndarray, list[Face]] | CliError]]:
    """Each of PATHS with its decoded image and faces, largest first (or the error that refused it), in order.

    With two or more threads to spend (`recognition.threads`, else the CPUs), a worker thread
    detects the next photo while the caller encodes this one, each stage with half the threads:
    ONNX Runtime's second thread gains little inside MTCNN's small nets or one FaceNet row, two
    stages at once gain more (2-core AVX512 EPYC, 100 frames of `benchmarks/pipeline.py`: 21.7 ms
    a frame one after the other at 2 threads, 13.3 ms overlapped at 1 + 1)."""
    budget = ctx.config.recognition.threads or os.cpu_count() or 1
    pipeline = ctx.pipeline(threads=max(1, budget // 2))

    def detect(item: tuple[Path, np.ndarray | CliError]) -> tuple[np.ndarray, list[Face]] | CliError:
        path, image = item
        if isinstance(image, CliError):
            return image
        try:
            return image, _faces(pipeline, path, image)
        except CliError as exc:
            return exc

    for (path, _), found in _ahead(_decoded(paths), detect, 1 if budget >= 2 else 0, "detect"):
        yield path, found


# -- enroll ---------------------------------------------------------------------------------

def _enroll(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.enrolment import embed_photos
    from facedoor.store import validate_name

    validate_name(args.name)
    sources = sum((bool(args.images), args.video is not None, args.camera is not None))
    if sources != 1:
        raise CliError("give photos, or --video FILE, or --camera [SOURCE]: exactly one of them")
    if not args.images:
        return _enroll_from_frames(args, ctx)

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
    publish_after(ctx, [args.name])
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


def _video_frames(path: Path, every_s: float, seconds: float | None) -> Iterator[np.ndarray]:
    """Frames of the video file at PATH, one per EVERY_S of video time (its first SECONDS)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise CliError(f"{path}: not a readable video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(1, round(fps * every_s))
    try:
        index = 0
        while seconds is None or index < seconds * fps:
            ok, image = cap.read()
            if not ok:
                return
            if index % step == 0:
                yield image
            index += 1
    finally:
        cap.release()


def _camera_frames(ctx: CliContext, source: str, every_s: float, seconds: float) -> Iterator[np.ndarray]:
    """Frames of the door camera (or SOURCE), one per EVERY_S, for SECONDS."""
    import time

    from facedoor.camera import Camera, CameraError

    camera = Camera(ctx.config.camera, source or None)
    camera.start()
    try:
        deadline = next_at = time.monotonic()
        deadline += seconds
        while time.monotonic() < deadline:
            frame = camera.get(timeout=0.5)
            if frame is not None and frame.t_mono >= next_at:
                next_at = frame.t_mono + every_s
                yield frame.image
            elif frame is None and camera.ended:
                return
    except CameraError as exc:
        raise CliError(str(exc)) from None
    finally:
        camera.stop()


def _enroll_from_frames(args: argparse.Namespace, ctx: CliContext) -> int:
    """`enroll NAME --video FILE | --camera [SOURCE]`: the K most diverse good frames, all or nothing."""
    import hashlib

    import numpy as np
    from tqdm import tqdm

    from facedoor.enrolment import EnrolmentError, frame_candidates, most_diverse, one_person

    if args.frames < 1 or args.every <= 0 or (args.seconds is not None and args.seconds <= 0):
        raise CliError("--frames, --every and --seconds must be positive")
    if args.video is not None:
        if not args.video.is_file():
            raise CliError(f"{args.video}: no such video file")
        frames, what = _video_frames(args.video, args.every, args.seconds), str(args.video)
        total = None
    else:
        seconds = args.seconds or 10.0
        frames, what = _camera_frames(ctx, args.camera, args.every, seconds), f"camera {args.camera or 'default'}"
        total = int(seconds / args.every)
        print(f"facedoor enroll: look at the camera for {seconds:g} s, turning your head a little", file=sys.stderr)
    rejected: dict[str, int] = {}
    bar = tqdm(total=total, desc=f"enrol {args.name}", unit="frame", file=sys.stderr, disable=ctx.json)

    def seen(index: int, reason: str | None) -> None:
        if reason is not None:
            rejected[reason.split(" (")[0]] = rejected.get(reason.split(" (")[0], 0) + 1
        bar.update(1)
        bar.set_postfix(good=bar.n - sum(rejected.values()))

    try:
        candidates = frame_candidates(ctx.pipeline(), frames, on_frame=seen)
    finally:
        bar.close()
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
    if len(candidates) < args.frames:
        raise CliError(f"{what}: {len(candidates)} usable frame(s) of {len(candidates) + sum(rejected.values())}, "
                       f"need {args.frames} (rejected: {reasons or 'none'}); nothing enrolled for {args.name!r}")
    try:
        kept = most_diverse(one_person(candidates), args.frames)
    except EnrolmentError as exc:
        raise CliError(f"{what}: {exc}; nothing enrolled for {args.name!r}") from None
    if len(kept) < args.frames:
        raise CliError(f"{what}: only {len(kept)} consistent frame(s), need {args.frames}; nothing enrolled")
    hashes = [hashlib.sha256(c.embedding.tobytes()).hexdigest() for c in kept]
    store = ctx.store(create=True)
    added = store.enroll(args.name, np.stack([c.embedding for c in kept]), hashes, replace=args.replace)
    publish_after(ctx, [args.name])
    ctx.emit({"identity": args.name, "enrolled": len(kept), "new": added, "source": what,
              "usable_frames": len(candidates), "rejected_frames": sum(rejected.values()),
              "store": str(store.path)},
             f"enrolled {args.name}: {len(kept)} diverse frame(s) of {len(candidates)} usable from {what}, "
             f"{added} new embedding(s) in {store.path}")
    return EXIT_OK


# -- list / remove --------------------------------------------------------------------------

def _list(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.liveness import gate_status

    gate = ctx.config.liveness
    print(gate_status(ctx.config.models, gate.enabled, gate.required, gate.challenge), file=sys.stderr)
    identities = ctx.store().identities()
    if not identities and not ctx.json:
        print(f"no one enrolled in {ctx.config.store}", file=sys.stderr)
    for ident in identities:
        note = f"  ({ident.stale} from another encoder: re-enrol with --replace)" if ident.stale else ""
        templates = f" + {ident.door_templates} door template(s)" if ident.door_templates else ""
        ctx.emit(
            {"identity": ident.name, "embeddings": ident.embeddings, "door_templates": ident.door_templates,
             "stale": ident.stale, "created": ident.created},
            f"{ident.name}\t{ident.embeddings} embedding(s){templates}\tenrolled {ident.created}{note}",
        )
    return EXIT_OK


def _remove(args: argparse.Namespace, ctx: CliContext) -> int:
    removed = ctx.store().remove(args.name)
    publish_after(ctx, [args.name])
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
        {"image": str(args.image), "identity": args.name, "distance": distance(match.distance),
         "threshold": match.threshold, "match": match.matched},
        f"{args.image}: {'MATCH' if match.matched else 'no match'} {args.name} "
        f"(distance {match.distance:.3f}, threshold {match.threshold:g})",
    )
    return EXIT_OK if match.matched else EXIT_NO_MATCH


def _identify(args: argparse.Namespace, ctx: CliContext) -> int:
    gallery = _gallery(ctx)
    failed = 0
    for path, found in _detected(ctx, args.images):  # models load before the first photo is decoded
        if isinstance(found, CliError):
            failed += 1
            print(f"facedoor identify: error: {found}", file=sys.stderr)
            continue
        image, faces = found
        ctx.pipeline().encode(image, faces[:1])
        face = faces[0]
        assert face.embedding is not None
        match = gallery.identify(face.embedding)
        who = match.identity if match.matched else None
        ctx.emit(
            {"image": str(path), "faces": len(faces), "identity": who, "distance": distance(match.distance),
             "threshold": match.threshold},
            f"{path}: {who or 'unknown'} (distance {match.distance:.3f}, threshold {match.threshold:g}, "
            f"{len(faces)} face(s))",
        )
    return EXIT_ERROR if failed else EXIT_OK


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register enroll, list, remove, verify and identify."""
    p = commands.add_parser(
        "enroll", parents=[REPORTING], help="enrol a person from photos, a video, or at the door camera",
        description="Each photo must show exactly one usable face: at least 28 px, sharp enough, and no "
                    "second face at least half its size. Tight face crops (e.g. 96x96 ID photos) work: "
                    "when no face is found on a small photo it is retried padded and upscaled. "
                    "With --camera or --video every sampled frame passes the same checks, frames of anyone "
                    "else are refused, and the --frames most diverse good frames (head pose, appearance) "
                    "are kept, so enrolment shares the door camera's light and angle. "
                    "Everything is stored in one transaction, or nothing.",
    )
    p.add_argument("name", help="identity name (unique, up to 64 characters)")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--video", type=Path, metavar="FILE", help="enrol from the frames of a video file")
    p.add_argument("--camera", nargs="?", const="", default=None, metavar="SOURCE",
                   help="enrol at the camera (default: camera.source of the config)")
    p.add_argument("--seconds", type=float, default=None,
                   help="how long to watch the camera (default 10), or how much of the video to use (default all)")
    p.add_argument("--frames", type=int, default=5, help="frames to keep (default 5)")
    p.add_argument("--every", type=float, default=0.2, metavar="S",
                   help="look at one frame every S seconds (default 0.2)")
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
