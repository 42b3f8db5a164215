"""Neural style transfer on ONNX Runtime: targets, the loss/gradient step, Adam and L-BFGS.

The exported `vgg19_nst_step` graph returns the loss and its gradient with respect to the image,
so optimisation is plain NumPy (Adam as in the exercise) or SciPy's L-BFGS-B. Images are RGB
float32 (H, W, 3) in [0, 255]; the graph subtracts the ImageNet means itself.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedoor.models import Manifest, ModelError
from facedoor_stylize.images import fit_area, resize

log = logging.getLogger(__name__)

FEATURES, STEP = "vgg19_features", "vgg19_nst_step"
IMAGENET_MEAN_RGB = np.array([123.68, 116.779, 103.939], np.float32)
MIN_SIDE = 16  # four 2x2 poolings before conv5_1
# Peak memory of one step, measured at 300x400 with ORT (see benchmarks/stylize.py), rounded up.
BYTES_PER_PIXEL = 6 * 1024
BASE_BYTES = 600 * 1024 * 1024


def export_hint(directory: Path) -> str:
    return (f"build them with `facedoor-export --out {directory} --only vgg19` (add "
            "--vgg19-untrained where the ImageNet weights cannot be downloaded)")


@dataclass
class Settings:
    """What one stylisation does; the defaults reproduce the exercise."""

    iterations: int = 200
    optimizer: str = "adam"  # or "lbfgs"
    lr: float = 2.0
    init: str = "noise"  # "content", "noise" or "style"
    noise_ratio: float = 0.6
    noise_range: float = 20.0
    alpha: float = 10.0
    beta: float = 40.0
    tv_weight: float = 0.0
    content_layers: dict[str, float] | None = None  # None: the graph's defaults
    style_layers: dict[str, float] | None = None
    seed: int = 0
    scales: int = 1  # coarse-to-fine levels (each halves the size)
    coarse_iterations: int | None = None  # per coarse level; default iterations // 2


@dataclass
class Progress:
    """One evaluated step, passed to the callback."""

    iteration: int
    J: float
    J_content: float
    J_style: float
    image: np.ndarray


@dataclass
class Result:
    image: np.ndarray
    J: float
    J_content: float
    J_style: float
    evaluations: int
    history: list[tuple[float, float, float]] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class Targets:
    """Content activations and (weight-averaged) style Grams for one content/style pair."""

    content: list[np.ndarray]
    grams: list[np.ndarray]
    style_offset: list[float]  # per layer: J_style of several styles minus J_style of the mean


class Stylizer:
    """The two ONNX sessions of a models directory, loaded once for any number of images."""

    def __init__(self, models: Path, threads: int | None = None):
        self.directory = Path(models)
        try:
            manifest = Manifest.load(self.directory)
            missing = [n for n in (FEATURES, STEP) if n not in manifest.entries]
            if missing:
                raise ModelError(f"{self.directory} has no {' or '.join(missing)} model; "
                                 + export_hint(self.directory))
            # NCHWc layout transforms: the step is all 3x3 convolutions
            self.features = manifest.session(FEATURES, threads, layout_optimization=True)
            self.step_session = manifest.session(STEP, threads, layout_optimization=True)
        except ModelError as exc:
            if "no model manifest" in str(exc):
                raise ModelError(f"no models in {self.directory}: "
                                 + export_hint(self.directory)) from exc
            raise
        entry = manifest.entry(STEP)
        log.info("loaded %s and %s from %s (%s weights)", FEATURES, STEP, self.directory,
                 entry.extra("weights", {}).get("source", "unknown"))
        self.untrained = entry.untrained or manifest.entry(FEATURES).untrained
        self.content_layers: list[str] = list(entry.extra("content_layers", []))
        self.style_layers: list[str] = list(entry.extra("style_layers", []))
        defaults = entry.extra("defaults", {})
        self.default_content = dict(zip(self.content_layers, defaults.get(
            "content_weights", [1.0] * len(self.content_layers))))
        self.default_style = dict(zip(self.style_layers, defaults.get(
            "style_weights", [1.0 / max(1, len(self.style_layers))] * len(self.style_layers))))
        self.channels: dict[str, int] = dict(entry.extra("layer_channels", {}))
        self.step_inputs = [i.name for i in self.step_session.get_inputs()]

    # -- weights ----------------------------------------------------------------------------
    def layer_weights(self, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer content and style weights in the graph's order; unknown layers rejected."""
        result = []
        for given, layers, default, kind in (
            (settings.content_layers, self.content_layers, self.default_content, "content"),
            (settings.style_layers, self.style_layers, self.default_style, "style"),
        ):
            weights = dict(default) if given is None else {n: 0.0 for n in layers}
            for name, weight in (given or {}).items():
                if name not in layers:
                    flag = f"--vgg19-{kind}-layers " + ",".join(sorted({*layers, name}))
                    raise ModelError(
                        f"{kind} layer {name!r} is not in the exported graph (has "
                        f"{', '.join(layers)}); rebuild with `facedoor-export --out "
                        f"{self.directory} --only vgg19 --force {flag}`")
                weights[name] = weight
            result.append(np.array([weights[n] for n in layers], np.float32))
        return result[0], result[1]

    # -- graph calls ------------------------------------------------------------------------
    def activations(self, image: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(content-layer activations, style-layer activations) of an RGB (H, W, 3) image."""
        out = self.features.run(None, {"image": image[None].astype(np.float32, copy=False)})
        n = len(self.content_layers)
        return out[:n], out[n:]

    def targets(self, content: np.ndarray, styles: list[tuple[np.ndarray, float]]) -> Targets:
        """Content activations and style Grams; several styles blend by weight.

        J_style is quadratic in the Gram, so sum_k w_k |G_k - G|^2 equals
        |mean_w G_k - G|^2 + sum_k w_k |G_k|^2 - |mean_w G_k|^2 (weights summing to 1): one graph
        run per step serves any number of styles, and the offset keeps J exact.
        """
        content_acts, _ = self.activations(content)
        total = sum(w for _, w in styles)
        grams: list[np.ndarray] = []
        squares: list[float] = []
        for image, weight in styles:
            _, acts = self.activations(image)
            for i, act in enumerate(acts):
                flat = act.reshape(act.shape[1], -1)
                gram = flat @ flat.T
                g = gram * (weight / total)
                sq = float(np.sum(np.square(gram, dtype=np.float64))) * weight / total
                if len(grams) <= i:
                    grams.append(g)
                    squares.append(sq)
                else:
                    grams[i] += g
                    squares[i] += sq
        offsets = [0.0] * len(grams) if len(styles) == 1 else [
            sq - float(np.sum(np.square(g, dtype=np.float64))) for g, sq in zip(grams, squares)]
        return Targets(content_acts, grams, offsets)

    def step(self, image: np.ndarray, targets: Targets, content_w: np.ndarray,
             style_w: np.ndarray, settings: Settings) -> tuple[float, float, float, np.ndarray]:
        """(J, J_content, J_style, dJ/dimage (H, W, 3)) for an RGB image."""
        feeds = [image[None].astype(np.float32, copy=False), *targets.content, *targets.grams,
                 content_w, style_w, np.array(settings.alpha, np.float32),
                 np.array(settings.beta, np.float32), np.array(settings.tv_weight, np.float32)]
        j, jc, js, _jtv, grad = self.step_session.run(
            None, dict(zip(self.step_inputs, feeds)))
        h, w = image.shape[:2]
        offset = self._style_offset(targets, style_w, h, w)
        return (float(j) + settings.beta * offset, float(jc), float(js) + offset, grad[0])

    def _style_offset(self, targets: Targets, style_w: np.ndarray, h: int, w: int) -> float:
        """The constant that turns J_style against the blended Gram into the weighted sum."""
        total = 0.0
        for i, (name, off) in enumerate(zip(self.style_layers, targets.style_offset)):
            if off:
                m = self._spatial(name, h, w)
                c = self.channels[name]
                total += float(style_w[i]) * off / (4.0 * c * c * m * m)
        return total

    def _spatial(self, name: str, h: int, w: int) -> int:
        """nH * nW of layer NAME for an h x w image (VALID 2x2 pools before its block)."""
        for _ in range(int(name[4]) - 1):
            h, w = h // 2, w // 2
        return h * w

    # -- optimisation -----------------------------------------------------------------------
    def initial_image(self, content: np.ndarray, style: np.ndarray, settings: Settings
                      ) -> np.ndarray:
        """The exercise's noise image (in mean-subtracted space), the content or the style."""
        if settings.init == "content":
            return content.astype(np.float32).copy()
        if settings.init == "style":
            return resize(style, *content.shape[:2]).astype(np.float32)
        rng = np.random.default_rng(settings.seed)
        noise = rng.uniform(-settings.noise_range, settings.noise_range, content.shape)
        centred = content - IMAGENET_MEAN_RGB
        mixed = noise * settings.noise_ratio + centred * (1.0 - settings.noise_ratio)
        return (mixed + IMAGENET_MEAN_RGB).astype(np.float32)

    def run(self, content: np.ndarray, styles: list[tuple[np.ndarray, float]],
            settings: Settings, callback: Callable[[Progress], None] | None = None) -> Result:
        """Stylise CONTENT (H, W, 3 RGB) with STYLES [(image, weight)]; Ctrl-C returns early.

        With `settings.scales` > 1 the image is first optimised at 1/2, 1/4 ... of the size
        (`coarse_iterations` each, 4x cheaper per halving) and upsampled as the next start.
        """
        h, w = content.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"image {h}x{w} is too small: both sides must be >= {MIN_SIDE}")
        content_w, style_w = self.layer_weights(settings)
        sizes = [(round(h / 2**k), round(w / 2**k)) for k in reversed(range(settings.scales))]
        sizes = [s for s in sizes if min(s) >= MIN_SIDE] or [(h, w)]
        state: dict = {"x": None, "evals": 0, "last": (np.nan, np.nan, np.nan)}
        history: list[tuple[float, float, float]] = []  # of the full-size level
        x = None
        try:
            for level, (lh, lw) in enumerate(sizes):
                final = level == len(sizes) - 1
                level_content = resize(content, lh, lw)
                level_styles = [(fit_area(s, s.shape[0] * s.shape[1] * lh * lw // (h * w)), wt)
                                for s, wt in styles]
                targets = self.targets(level_content, level_styles)
                x = (self.initial_image(level_content, level_styles[0][0], settings)
                     if x is None else resize(x, lh, lw))
                iterations = settings.iterations if final else (
                    settings.coarse_iterations or max(1, settings.iterations // 2))
                evaluate = self._evaluator(targets, content_w, style_w, settings, state,
                                           history if final else None, callback)
                if settings.optimizer == "lbfgs":
                    x = _lbfgs(evaluate, x, iterations)
                else:
                    x = _adam(evaluate, x, iterations, settings.lr)
            assert x is not None
            j, jc, js, _ = self.step(x, targets, content_w, style_w, settings)  # of the result
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
            x = state["x"] if state["x"] is not None else content
            x = resize(np.asarray(x, np.float32), h, w)
            j, jc, js = state["last"]
        return Result(np.asarray(x, np.float32), j, jc, js, state["evals"], history, interrupted)

    def _evaluator(self, targets: Targets, content_w: np.ndarray, style_w: np.ndarray,
                   settings: Settings, state: dict, history: list | None,
                   callback: Callable[[Progress], None] | None
                   ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        """loss+gradient for the optimisers; records state, history and progress."""

        def evaluate(image: np.ndarray) -> tuple[float, np.ndarray]:
            j, jc, js, grad = self.step(image, targets, content_w, style_w, settings)
            state.update(x=image, last=(j, jc, js))
            if history is not None:
                history.append((j, jc, js))
            if callback:
                callback(Progress(state["evals"], j, jc, js, image))
            state["evals"] += 1
            return j, grad

        return evaluate


def _adam(evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray,
          iterations: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8) -> np.ndarray:
    """TensorFlow 1's AdamOptimizer (the exercise's), unbounded pixels, one step per evaluation.

    `evaluate` sees the image before each update (iteration 0: the initial image).
    """
    x = x.astype(np.float32).copy()
    m: np.ndarray = np.zeros_like(x)
    v: np.ndarray = np.zeros_like(x)
    for t in range(1, iterations + 1):
        _, grad = evaluate(x.copy())
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        step = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        x -= step * m / (np.sqrt(v) + eps)
    return x


def _lbfgs(evaluate: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray,
           evaluations: int) -> np.ndarray:
    """SciPy L-BFGS-B with pixels bounded to [0, 255], at most EVALUATIONS loss+gradient calls."""
    from scipy.optimize import minimize

    shape = x.shape
    start = np.clip(x, 0.0, 255.0).astype(np.float64).ravel()
    best = {"j": np.inf, "x": start}

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        image = flat.reshape(shape).astype(np.float32)
        j, grad = evaluate(image)
        if j < best["j"]:
            best.update(j=j, x=flat.copy())
        return j, grad.astype(np.float64).ravel()

    minimize(fun, start, jac=True, method="L-BFGS-B", bounds=[(0.0, 255.0)] * start.size,
             options={"maxfun": evaluations, "maxiter": evaluations, "maxcor": 20})
    return best["x"].reshape(shape).astype(np.float32)
