"""`facedoor-stylize CONTENT STYLE -o OUT`: neural style transfer, one image or a batch.

CONTENT and STYLE are a file, a glob or `@LIST` (a text file of paths, one per line); every
content is stylised with every style, the models loaded once. A STYLE of the form
`a.jpg:0.7+b.jpg:0.3` blends several style images by weight. The defaults reproduce the
exercise (noise init, Adam lr 2.0, 200 iterations, 300x400).
"""
from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facedoor.files import NotWritableError, check_writable
from facedoor.models import SYSTEM_MODELS_DIR, ModelError, default_models_dir
from facedoor_stylize import images
from facedoor_stylize.engine import BASE_BYTES, BYTES_PER_PIXEL, MIN_SIDE, Progress, Result, Settings, Stylizer
from facedoor_stylize.images import ImageError

PROG = "facedoor-stylize"


class UsageError(ValueError):
    """Bad arguments or inputs: one line on stderr, exit 2."""


@dataclass
class StyleSpec:
    """One style: one image, or several blended by weight."""

    parts: list[tuple[Path, float]]

    @property
    def label(self) -> str:
        return "+".join(p.stem for p, _ in self.parts)


@dataclass
class Row:
    content: str
    style: str
    size: str
    evaluations: int
    J: float
    J_content: float
    J_style: float
    seconds: float
    output: str


def _expand(spec: str, what: str) -> list[Path]:
    """A path, a glob, or @LIST -> existing paths (in order); none found is a UsageError."""
    if spec.startswith("@"):
        listing = Path(spec[1:])
        try:
            lines = listing.read_text().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read {what} list {listing}: {exc.strerror or exc}") from exc
        paths = [Path(line.strip()) for line in lines
                 if line.strip() and not line.lstrip().startswith("#")]
        paths = [p if p.is_absolute() else listing.parent / p for p in paths]
        if not paths:
            raise UsageError(f"{what} list {listing} names no images")
        return paths
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(spec))]
        if not paths:
            raise UsageError(f"no {what} images match {spec!r}")
        return paths
    return [Path(spec)]


def _style_specs(spec: str) -> list[StyleSpec]:
    """`a.jpg`, a glob or @LIST (one style each), or `a.jpg:0.7+b.jpg:0.3` (one blend)."""
    if "+" not in spec:
        return [StyleSpec([(p, 1.0)]) for p in _expand(spec, "style")]
    parts = []
    for item in spec.split("+"):
        path, _, weight = item.rpartition(":")
        try:
            value = float(weight) if path else 1.0
        except ValueError:
            path, value = item, 1.0
        if value <= 0:
            raise UsageError(f"style weight of {path or item} must be > 0, got {value:g}")
        parts.append((Path(path or item), value))
    return [StyleSpec(parts)]


def _layer_weights(values: list[str] | None, default_weight: float, flag: str
                   ) -> dict[str, float] | None:
    if not values:
        return None
    weights = {}
    for value in values:
        name, _, weight = value.partition(":")
        try:
            weights[name.strip()] = float(weight) if weight else default_weight
        except ValueError:
            raise UsageError(f"{flag} {value!r}: expected NAME or NAME:WEIGHT") from None
    return weights


def _size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 300x400, got {value!r}") from None
    if min(h, w) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"both sides must be >= {MIN_SIDE}, got {value!r}")
    return h, w


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Neural style transfer (Gatys et al.) on ONNX Runtime, one "
        "image or a batch; the defaults reproduce the exercise.",
        epilog="Models: `facedoor-export --out DIR --only vgg19`. Ctrl-C saves the current "
               "image and stops.")
    p.add_argument("content", metavar="CONTENT", help="content image, glob or @LIST")
    p.add_argument("style", metavar="STYLE",
                   help="style image, glob or @LIST; a.jpg:0.7+b.jpg:0.3 blends styles")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="OUT",
                   help="output image (one pair) or directory (batch: CONTENT__STYLE.png)")
    p.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="models directory (default: $FACEDOOR_MODELS, ./models, "
                        f"{SYSTEM_MODELS_DIR})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=_size, default=None, metavar="HxW",
                      help="output size (default 300x400, as the exercise)")
    size.add_argument("--max-side", type=_positive, metavar="N",
                      help="scale the content so its longer side is N, keeping its aspect")
    p.add_argument("--iterations", type=_positive, default=200, metavar="N",
                   help="loss+gradient evaluations (default 200)")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam",
                   help="adam (the exercise, lr --lr) or lbfgs (SciPy L-BFGS-B, pixels in "
                        "[0, 255]; usually fewer iterations for the same loss)")
    p.add_argument("--scales", type=_positive, default=1, metavar="N",
                   help="coarse-to-fine: optimise at 1/2^(N-1) of the size first, then "
                        "double up to the full size (default 1: full size only)")
    p.add_argument("--coarse-iterations", type=_positive, metavar="M",
                   help="iterations per coarse level (default: half of --iterations)")
    p.add_argument("--lr", type=float, default=2.0, help="Adam learning rate (default 2.0)")
    p.add_argument("--init", choices=("noise", "content", "style"), default="noise",
                   help="start image (default noise: uniform [-20, 20] mixed with the content)")
    p.add_argument("--noise-ratio", type=float, default=0.6,
                   help="share of noise in the noise init (default 0.6)")
    p.add_argument("--alpha", type=float, default=10.0, help="content weight (default 10)")
    p.add_argument("--beta", type=float, default=40.0, help="style weight (default 40)")
    p.add_argument("--tv-weight", type=float, default=0.0,
                   help="total-variation weight (smoother images; default 0)")
    p.add_argument("--content-layer", action="append", metavar="NAME[:WEIGHT]",
                   help="content layer (default conv4_2); repeat for several")
    p.add_argument("--style-layer", action="append", metavar="NAME:WEIGHT",
                   help="style layer and weight (default conv1_1..conv5_1 at 0.2); repeat")
    p.add_argument("--preserve-colors", action="store_true",
                   help="keep the content's colours: transfer luminance only")
    p.add_argument("--save-every", type=_positive, metavar="N",
                   help="also write every N-th iterate to OUT_STEM_steps/<i>.png")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="ONNX Runtime threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def _check_writable(directory: Path) -> None:
    try:
        check_writable(directory)
    except NotWritableError as exc:
        raise UsageError(str(exc)) from None


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup v2 limit."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(height: int, width: int, available: int | None) -> None:
    """Refuse a size whose estimated peak memory exceeds what is available; suggest --max-side."""
    need = BASE_BYTES + BYTES_PER_PIXEL * height * width
    if available is None or need <= available:
        return
    pixels = max(0, available - BASE_BYTES) / BYTES_PER_PIXEL
    side = int((pixels * max(height, width) / min(height, width)) ** 0.5)
    hint = (f"try --max-side {side}" if side >= MIN_SIDE * 2
            else "free some memory first")
    raise UsageError(f"{height}x{width} needs about {need / 2**30:.1f} GiB, only "
                     f"{available / 2**30:.1f} GiB is available; {hint}")


def _outputs(out: Path, pairs: list[tuple[Path, StyleSpec]]) -> list[Path]:
    """One output path per pair: OUT itself for a single pair named like an image."""
    if len(pairs) == 1 and out.suffix.lower() in images.IMAGE_SUFFIXES:
        return [out]
    if out.suffix.lower() in images.IMAGE_SUFFIXES:
        raise UsageError(f"{len(pairs)} content/style pairs need a directory for -o, "
                         f"not the image name {out}")
    return [out / f"{c.stem}__{s.label}.png" for c, s in pairs]


def _table(rows: list[Row]) -> str:
    head = ("content", "style", "size", "iters", "J", "J_content", "J_style", "s", "output")
    body = [(r.content, r.style, r.size, str(r.evaluations), f"{r.J:.4g}", f"{r.J_content:.4g}",
             f"{r.J_style:.4g}", f"{r.seconds:.1f}", r.output) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths))
                     for line in (head, *body))


def run(args: argparse.Namespace) -> int:
    contents = _expand(args.content, "content")
    styles = _style_specs(args.style)
    pairs = [(c, s) for c in contents for s in styles]
    outputs = _outputs(args.out, pairs)
    for directory in dict.fromkeys(o.parent for o in outputs):
        _check_writable(directory)
    loaded = {p: images.read_rgb(p) for p in
              dict.fromkeys([*contents, *(p for s in styles for p, _ in s.parts)])}
    sizes = {c: images.output_size(loaded[c].shape, args.size, args.max_side)
             for c in contents}
    for c, (h, w) in sizes.items():
        if min(h, w) < MIN_SIDE:
            raise UsageError(f"{c} would be {h}x{w}: both sides must be >= {MIN_SIDE}")
    largest = max(sizes.values(), key=lambda hw: hw[0] * hw[1])
    check_memory(*largest, available_memory())

    models = args.models or default_models_dir()
    stylizer = Stylizer(models, args.threads)
    if stylizer.untrained:
        print(f"{PROG}: WARNING: {models} holds UNTRAINED VGG-19 weights (exported with "
              "--vgg19-untrained, for tests): results will not look like the style. Export "
              "the real ones with `facedoor-export --only vgg19` on a machine with internet.",
              file=sys.stderr)
    settings = Settings(
        iterations=args.iterations, optimizer=args.optimizer, lr=args.lr, init=args.init,
        noise_ratio=args.noise_ratio, alpha=args.alpha, beta=args.beta,
        tv_weight=args.tv_weight, seed=args.seed, scales=args.scales,
        coarse_iterations=args.coarse_iterations,
        content_layers=_layer_weights(args.content_layer, 1.0, "--content-layer"),
        style_layers=_layer_weights(args.style_layer, 1.0, "--style-layer"))
    stylizer.layer_weights(settings)  # unknown layers fail before any work

    rows: list[Row] = []
    for (content_path, spec), out in zip(pairs, outputs):
        h, w = sizes[content_path]
        content = images.resize(loaded[content_path], h, w)
        blend = [(images.fit_area(loaded[p], h * w), weight) for p, weight in spec.parts]
        steps_dir = out.with_name(out.stem + "_steps") if args.save_every else None
        if steps_dir:
            _check_writable(steps_dir)
        result, seconds = _stylize_one(stylizer, content, blend, settings, args, out, steps_dir)
        image = images.preserve_colors(result.image, content) if args.preserve_colors \
            else result.image
        images.save_rgb(out, image)
        rows.append(Row(str(content_path), spec.label, f"{h}x{w}", result.evaluations, result.J,
                        result.J_content, result.J_style, seconds, str(out)))
        if result.interrupted:
            print(f"{PROG}: interrupted after {result.evaluations} iterations; saved the "
                  f"current image to {out}", file=sys.stderr)
            return 130
    print(_table(rows))
    return 0


def _stylize_one(stylizer: Stylizer, content: np.ndarray, styles: list[tuple[np.ndarray, float]],
                 settings: Settings, args: argparse.Namespace, out: Path,
                 steps_dir: Path | None) -> tuple[Result, float]:
    """One content/style pair with a progress bar; intermediates every --save-every."""
    from tqdm import tqdm

    coarse = (settings.scales - 1) * (settings.coarse_iterations or settings.iterations // 2)
    bar = tqdm(total=settings.iterations + coarse, desc=out.name, unit="it", disable=args.quiet,
               leave=True, dynamic_ncols=True)

    def progress(p: Progress) -> None:
        bar.update(1)
        bar.set_postfix(J=f"{p.J:.4g}", J_content=f"{p.J_content:.4g}",
                        J_style=f"{p.J_style:.4g}", refresh=False)
        if steps_dir and p.iteration % args.save_every == 0:
            image = images.preserve_colors(p.image, content) if args.preserve_colors \
                else p.image
            images.save_rgb(steps_dir / f"{p.iteration}.png", image)

    started = time.monotonic()
    try:
        result = stylizer.run(content, styles, settings, progress)
    finally:
        bar.close()
    return result, time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (UsageError, ImageError, ModelError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before any image was produced", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
