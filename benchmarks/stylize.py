"""Benchmark facedoor-stylize: ONNX step vs TensorFlow step, Adam vs L-BFGS, peak RSS.

    .venv/bin/python benchmarks/stylize.py [--models DIR] [--size 300x400] [--adam 200]
        [--step-repeats 5]

1. Seconds per loss+gradient evaluation: the exported `vgg19_nst_step` in ONNX Runtime against
   the same loss differentiated by TensorFlow (`tf.function`, NHWC, same weights), alternating
   in one process, on the exercise's images (louvre_small.jpg + monet_800600.jpg).
2. Time to the loss that --adam Adam iterations reach: Adam on ONNX Runtime (measured), Adam on
   TensorFlow (its measured step time x the iterations: an extrapolation, said so in the
   table), L-BFGS and coarse-to-fine L-BFGS on ONNX Runtime (measured until they reach it).
3. Peak RSS of `facedoor-stylize` alone (a child process, no TensorFlow) at the size.
Results (images, loss curves PNG, table) go to benchmarks/results/stylize/.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NST = REPO.parent / "shared" / "data" / "nst"
RESULTS = REPO / "benchmarks" / "results" / "stylize"
BIN = Path(sys.executable).parent


def ensure_models(models: Path) -> None:
    if (models / "manifest.json").is_file():
        return
    print(f"exporting untrained VGG-19 graphs into {models} (no internet for the real ones)")
    subprocess.run([str(BIN / "facedoor-export"), "--out", str(models), "--only", "vgg19",
                    "--vgg19-untrained"], check=True)


def tf_step(stylizer, weights_source: str):
    """A tf.function computing the same loss + gradient as the ONNX step, and its inputs."""
    import tensorflow as tf

    from facedoor_export import vgg19
    from facedoor_export.nst_graph import NSTGraph

    weights = vgg19.untrained() if weights_source.startswith("untrained") else vgg19.imagenet()
    graph = NSTGraph(weights, stylizer.content_layers, stylizer.style_layers, layout="NHWC")
    return tf.function(graph.autodiff, input_signature=graph.step_signature(),
                       autograph=False), tf


def measure_steps(stylizer, targets, settings, x, repeats: int, weights_source: str
                  ) -> tuple[list[float], list[float], float]:
    """Alternating ORT / TF step timings (seconds) and the relative L2 gap of their gradients."""
    content_w, style_w = stylizer.layer_weights(settings)
    fn, tf = tf_step(stylizer, weights_source)
    tf_inputs = [tf.constant(x[None]),
                 *[tf.constant(t.transpose(0, 2, 3, 1)) for t in targets.content],
                 *[tf.constant(g) for g in targets.grams], tf.constant(content_w),
                 tf.constant(style_w), tf.constant(np.float32(settings.alpha)),
                 tf.constant(np.float32(settings.beta)), tf.constant(np.float32(0.0))]
    ort_grad = stylizer.step(x, targets, content_w, style_w, settings)[3]  # warm-up
    tf_grad = fn(*tf_inputs)[4].numpy()[0]  # warm-up (tracing)
    gap = float(np.linalg.norm(ort_grad - tf_grad) / np.linalg.norm(tf_grad))
    ort_times, tf_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stylizer.step(x, targets, content_w, style_w, settings)
        ort_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn(*tf_inputs)[4].numpy()
        tf_times.append(time.perf_counter() - t0)
    return ort_times, tf_times, gap


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=RESULTS / "models")
    ap.add_argument("--size", default="300x400")
    ap.add_argument("--adam", type=int, default=200, help="Adam iterations defining the target")
    ap.add_argument("--lbfgs-max", type=int, default=200, help="L-BFGS evaluation cap")
    ap.add_argument("--coarse-iterations", type=int, default=40,
                    help="half-size L-BFGS evaluations before the full size (coarse-to-fine)")
    ap.add_argument("--step-repeats", type=int, default=5)
    ap.add_argument("--rss-iterations", type=int, default=3)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    ensure_models(args.models)

    sys.path.insert(0, str(REPO / "daemon"))
    from facedoor_stylize import images
    from facedoor_stylize.engine import Settings, Stylizer

    content_path = NST / "louvre_small.jpg"
    style_path = NST / "monet_800600.jpg"
    if not style_path.is_file():
        style_path = NST / "claude-monet.jpg"
    content = images.resize(images.read_rgb(content_path), h, w)
    style = images.fit_area(images.read_rgb(style_path), h * w)

    # 3. peak RSS of the runtime alone, first (a clean child process)
    rss_out = RESULTS / "rss.png"
    started = time.monotonic()
    subprocess.run([str(BIN / "facedoor-stylize"), "--models", str(args.models), "-q",
                    str(content_path), str(style_path), "-o", str(rss_out), "--size", args.size,
                    "--iterations", str(args.rss_iterations)], check=True,
                   stderr=subprocess.DEVNULL)
    rss_seconds = time.monotonic() - started
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    stylizer = Stylizer(args.models)
    untrained = stylizer.untrained
    manifest = json.loads((args.models / "manifest.json").read_text())
    weights_source = manifest["models"]["vgg19_nst_step"]["weights"]["source"]
    settings = Settings(iterations=args.adam)
    targets = stylizer.targets(content, [(style, 1.0)])
    x0 = stylizer.initial_image(content, style, settings)

    # 1. step timings
    ort_t, tf_t, gap = measure_steps(stylizer, targets, settings, x0, args.step_repeats,
                                     weights_source)
    ratio = statistics.median(ort_t) / statistics.median(tf_t)

    # 2. Adam (ORT, measured) defines the target; L-BFGS runs stop once they reach it
    full = (h, w)

    def timed(opt_settings: Settings, target: float | None = None):
        """Run; (result, seconds since start at each full-size evaluation)."""
        stamps: list[float] = []
        t0 = time.perf_counter()

        def progress(p) -> None:
            if p.image.shape[:2] == full:
                stamps.append(time.perf_counter() - t0)
                if target is not None and p.J <= target:
                    raise KeyboardInterrupt  # reached: stop here (the engine returns the image)

        return stylizer.run(content, [(style, 1.0)], opt_settings, progress), stamps

    adam, adam_stamps = timed(settings)
    target = adam.J
    adam_time = adam_stamps[-1]
    tf_adam_time = statistics.median(tf_t) * args.adam
    runs = {"L-BFGS": Settings(iterations=args.lbfgs_max, optimizer="lbfgs"),
            "L-BFGS coarse-to-fine (2 scales)": Settings(
                iterations=args.lbfgs_max, optimizer="lbfgs", scales=2,
                coarse_iterations=args.coarse_iterations)}
    measured = {}
    for name, run_settings in runs.items():
        result, stamps = timed(run_settings, target)
        curve = [j for j, _, _ in result.history]
        reached = next((i for i, j in enumerate(curve) if j <= target), None)
        measured[name] = (result, stamps, reached)

    images.save_rgb(RESULTS / "adam.png", adam.image)
    for name, (result, _, _) in measured.items():
        images.save_rgb(RESULTS / (name.split()[0].lower() + ("_c2f" if "coarse" in name
                                                              else "") + ".png"), result.image)
    plot({"Adam lr 2.0": (adam, adam_stamps),
          **{n: (r, st) for n, (r, st, _) in measured.items()}}, target, RESULTS / "loss.png")

    weights_note = "UNTRAINED weights (real VGG-19 unreachable here)" if untrained else \
        "ImageNet weights"
    cores = len(os.sched_getaffinity(0))
    coarse_note = f"incl. {args.coarse_iterations} half-size evaluations"
    lines = [
        f"facedoor-stylize benchmark: {content_path.name} + {style_path.name}, {h}x{w}, "
        f"{weights_note}, {cores} cores",
        "",
        "| measure | value |",
        "|---|---|",
        f"| ONNX step s/iter (median, p95, n={len(ort_t)}) | {statistics.median(ort_t):.3f}, "
        f"{p95(ort_t):.3f} |",
        f"| TF tf.function step s/iter (median, p95) | {statistics.median(tf_t):.3f}, "
        f"{p95(tf_t):.3f} |",
        f"| ratio ONNX / TF (target <= 1.0) | {ratio:.2f} |",
        f"| gradient ONNX vs TF, relative L2 | {gap:.2e} |",
        f"| Adam {args.adam} iterations: final J | {target:.5g} |",
        f"| Adam on ONNX: time to that J (measured) | {adam_time:.1f} s |",
        f"| Adam on TF: time to that J (TF step median x {args.adam}, extrapolated) | "
        f"{tf_adam_time:.1f} s |",
        *[f"| {name} on ONNX: evaluations / time to that J (measured; "
          f"{coarse_note if 'coarse' in name else 'full size'}) | "
          f"{'not reached in ' + str(len(r.history)) if k is None else k + 1} / "
          f"{(st[k] if k is not None else float('nan')):.1f} s "
          f"({(st[k] if k is not None else float('nan')) / tf_adam_time:.2f} of TF-Adam; "
          "target <= 0.33) |"
          for name, (r, st, k) in measured.items()],
        f"| peak RSS facedoor-stylize {h}x{w} ({args.rss_iterations} it, {rss_seconds:.0f} s "
        f"incl. start; target <= 1.5 GB) | {peak_rss / 2**30:.2f} GiB |",
        "",
        f"images: {RESULTS}/adam.png, l-bfgs.png, l-bfgs_c2f.png; loss curves: {RESULTS}/loss.png",
    ]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "table.md").write_text(text + "\n")
    return 0


def plot(curves: dict, target: float, path: Path) -> None:
    """Loss against wall-clock seconds for each run (log scale), the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (result, stamps) in curves.items():
        js = [j for j, _, _ in result.history]
        ax.semilogy(stamps[:len(js)], js[:len(stamps)], label=name,
                    marker="o" if len(js) < 5 else None)
    ax.axhline(target, color="grey", linestyle=":", label="Adam final loss (target)")
    ax.set_xlabel("seconds (ONNX Runtime, this machine)")
    ax.set_ylabel("J")
    ax.legend()
    ax.set_title("facedoor-stylize: loss vs time at full size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
