"""facedoor-stylize on real ONNX Runtime sessions of an exported (untrained) VGG-19."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor_stylize import cli, images
from facedoor_stylize.engine import Settings, Stylizer


def _cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facedoor" / "test-models-vgg19"


@pytest.fixture(scope="session")
def nst_models() -> Path:
    """`facedoor-export --only vgg19 --vgg19-untrained` once per cache (up-to-date runs skip)."""
    pytest.importorskip("tensorflow")
    out = _cache()
    exporter = Path(sys.executable).with_name("facedoor-export")
    proc = subprocess.run([str(exporter), "--out", str(out), "--only", "vgg19",
                           "--vgg19-untrained"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def stylizer(nst_models: Path) -> Stylizer:
    return Stylizer(nst_models)


def synthetic(path: Path, seed: int, size: tuple[int, int] = (48, 64)) -> Path:
    """A small colourful test image (gradients + shapes), written with OpenCV."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 80.0)], -1)
    for _ in range(4):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(img, center, int(rng.integers(4, 14)), color, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img.astype(np.uint8))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return synthetic(tmp_path / "content.png", 1), synthetic(tmp_path / "style.jpg", 2)


def test_manifest_marks_untrained_weights_and_layers(stylizer: Stylizer):
    assert stylizer.untrained
    assert stylizer.content_layers == ["conv4_2"]
    assert stylizer.style_layers == ["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]
    content_w, style_w = stylizer.layer_weights(Settings())
    assert content_w.tolist() == [1.0] and style_w.tolist() == pytest.approx([0.2] * 5)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_loss_decreases(stylizer: Stylizer, pair, optimizer: str):
    content, style = (images.resize(images.read_rgb(p), 32, 40) for p in pair)
    result = stylizer.run(content, [(style, 1.0)], Settings(iterations=6, optimizer=optimizer))
    js = [j for j, _, _ in result.history]
    assert len(js) >= 6 and result.evaluations == len(js)
    assert result.J < js[0] * 0.95, js
    assert result.image.shape == (32, 40, 3) and np.isfinite(result.image).all()
    if optimizer == "lbfgs":
        assert result.image.min() >= 0.0 and result.image.max() <= 255.0


def test_gradient_matches_finite_difference_of_the_loss(stylizer: Stylizer, pair):
    content, style = (images.resize(images.read_rgb(p), 24, 32) for p in pair)
    settings = Settings(tv_weight=0.5)
    targets = stylizer.targets(content, [(style, 1.0)])
    cw, sw = stylizer.layer_weights(settings)
    x = stylizer.initial_image(content, style, settings).astype(np.float64)
    _, _, _, grad = stylizer.step(x.astype(np.float32), targets, cw, sw, settings)
    direction = np.random.default_rng(0).normal(size=x.shape)
    eps = 1e-2
    up = stylizer.step((x + eps * direction).astype(np.float32), targets, cw, sw, settings)[0]
    down = stylizer.step((x - eps * direction).astype(np.float32), targets, cw, sw, settings)[0]
    numeric = (up - down) / (2 * eps)
    assert float(np.sum(grad * direction)) == pytest.approx(numeric, rel=2e-2)


def test_blended_styles_cost_the_weighted_sum_of_each(stylizer: Stylizer, tmp_path, pair):
    content = images.resize(images.read_rgb(pair[0]), 24, 32)
    a = images.resize(images.read_rgb(pair[1]), 24, 32)
    b = images.resize(images.read_rgb(synthetic(tmp_path / "b.png", 9)), 24, 32)
    settings = Settings()
    cw, sw = stylizer.layer_weights(settings)
    x = stylizer.initial_image(content, a, settings)
    cost = {}
    for key, styles in (("a", [(a, 1.0)]), ("b", [(b, 1.0)]), ("ab", [(a, 3.0), (b, 1.0)])):
        cost[key] = stylizer.step(x, stylizer.targets(content, styles), cw, sw, settings)[2]
    assert cost["ab"] == pytest.approx(0.75 * cost["a"] + 0.25 * cost["b"], rel=1e-3)


def test_interrupt_returns_the_current_image(stylizer: Stylizer, pair):
    content, style = (images.resize(images.read_rgb(p), 24, 32) for p in pair)

    def stop(progress):
        if progress.iteration == 2:
            raise KeyboardInterrupt

    result = stylizer.run(content, [(style, 1.0)], Settings(iterations=50), stop)
    assert result.interrupted and result.evaluations == 2
    assert result.image.shape == (24, 32, 3)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_result_and_intermediates(nst_models, pair, tmp_path, capsys):
    out = tmp_path / "out" / "result.png"
    code, stdout, stderr = run_cli(capsys, "--models", nst_models, *pair, "-o", out,
                                   "--size", "32x40", "--iterations", "4", "--save-every", "2",
                                   "--tv-weight", "0.1", "--style-layer", "conv1_1:0.5",
                                   "--style-layer", "conv3_1:0.5", "-q")
    assert code == 0, stderr
    assert "UNTRAINED" in stderr
    assert cv2.imread(str(out)).shape == (32, 40, 3)
    steps = out.parent / "result_steps"
    assert sorted(p.name for p in steps.iterdir()) == ["0.png", "2.png"]
    assert "J_content" in stdout and str(out) in stdout


def test_cli_batch_with_globs_and_list(nst_models, tmp_path, capsys):
    for i in range(2):
        synthetic(tmp_path / "in" / f"c{i}.png", i)
    styles = [synthetic(tmp_path / "styles" / f"s{i}.png", 10 + i) for i in range(2)]
    listing = tmp_path / "styles.txt"
    listing.write_text("# styles\n" + "\n".join(f"styles/{p.name}" for p in styles) + "\n")
    code, stdout, stderr = run_cli(capsys, "--models", nst_models, tmp_path / "in" / "*.png",
                                   f"@{listing}", "-o", tmp_path / "batch", "--max-side", "40",
                                   "--iterations", "2", "--optimizer", "lbfgs",
                                   "--preserve-colors", "-q")
    assert code == 0, stderr
    made = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert made == ["c0__s0.png", "c0__s1.png", "c1__s0.png", "c1__s1.png"]
    assert cv2.imread(str(tmp_path / "batch" / "c0__s0.png")).shape == (30, 40, 3)
    assert len([line for line in stdout.splitlines() if "__s" in line]) == 4


def test_preserve_colors_keeps_content_chroma():
    rng = np.random.default_rng(0)
    content = rng.uniform(100, 150, (8, 8, 3)).astype(np.float32)  # no clipping in RGB
    styled = rng.uniform(100, 150, (8, 8, 3)).astype(np.float32)
    out = images.preserve_colors(styled, content)
    ycc = lambda x: cv2.cvtColor(images.to_uint8(x), cv2.COLOR_RGB2YCrCb).astype(int)  # noqa: E731
    assert np.abs(ycc(out)[..., 0] - ycc(styled)[..., 0]).max() <= 3
    assert np.abs(ycc(out)[..., 1:] - ycc(content)[..., 1:]).max() <= 3


def test_cli_ctrl_c_saves_current_image(nst_models, pair, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_step = Stylizer.step

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Stylizer, "step", interrupted_step)
    out = tmp_path / "r.png"
    code, _, stderr = run_cli(capsys, "--models", nst_models, *pair, "-o", out,
                              "--size", "24x32", "--iterations", "50", "-q")
    assert code == 130 and "saved the current image" in stderr and out.is_file()


# -- errors: one line on stderr, exit 2, nothing written --------------------------------------
def test_unreadable_image(nst_models, tmp_path, capsys, pair):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code, _, stderr = run_cli(capsys, "--models", nst_models, bad, pair[1], "-o",
                              tmp_path / "o.png")
    assert code == 2 and f"cannot read image {bad}" in stderr
    assert not (tmp_path / "o.png").exists()


def test_missing_content(nst_models, tmp_path, capsys, pair):
    code, _, stderr = run_cli(capsys, "--models", nst_models, tmp_path / "nope.png", pair[1],
                              "-o", tmp_path / "o.png")
    assert code == 2 and "nope.png" in stderr and len(stderr.strip().splitlines()) == 1


def test_unwritable_output_directory(nst_models, tmp_path, capsys, pair):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run_cli(capsys, "--models", nst_models, *pair, "-o",
                              blocker / "sub" / "o.png")
    assert code == 2 and "not writable" in stderr and str(blocker / "sub") in stderr


def test_missing_models_say_how_to_build_them(tmp_path, capsys, pair):
    code, _, stderr = run_cli(capsys, "--models", tmp_path / "empty", *pair, "-o",
                              tmp_path / "o.png")
    assert code == 2
    assert f"facedoor-export --out {tmp_path / 'empty'} --only vgg19" in stderr


def test_too_large_for_memory_suggests_max_side(nst_models, tmp_path, capsys, pair):
    code, _, stderr = run_cli(capsys, "--models", nst_models, *pair, "-o", tmp_path / "o.png",
                              "--size", "30000x40000")
    assert code == 2 and "--max-side" in stderr and "GiB" in stderr


def test_memory_check_suggestion_fits():
    with pytest.raises(cli.UsageError, match=r"--max-side (\d+)") as info:
        cli.check_memory(3000, 4000, 2 * 2**30)
    side = int(info.value.args[0].split("--max-side ")[1].split()[0])
    cli.check_memory(side * 3 // 4, side, 2 * 2**30)  # the suggestion itself fits


def test_style_layer_not_in_graph(nst_models, tmp_path, capsys, pair):
    code, _, stderr = run_cli(capsys, "--models", nst_models, *pair, "-o", tmp_path / "o.png",
                              "--style-layer", "conv3_3:1")
    assert code == 2 and "conv3_3" in stderr and "--vgg19-style-layers" in stderr


def test_batch_needs_a_directory(nst_models, tmp_path, capsys, pair):
    other = synthetic(tmp_path / "c2.png", 5)
    code, _, stderr = run_cli(capsys, "--models", nst_models, tmp_path / "c*.png", pair[1],
                              "-o", tmp_path / "o.png")
    assert code == 2 and "need a directory" in stderr and other.exists()


def test_coarse_to_fine_ends_at_full_size(stylizer: Stylizer, pair):
    content, style = (images.resize(images.read_rgb(p), 36, 48) for p in pair)
    seen = []
    result = stylizer.run(content, [(style, 1.0)],
                          Settings(iterations=3, scales=2, coarse_iterations=2,
                                   optimizer="lbfgs"),
                          lambda p: seen.append(p.image.shape[:2]))
    coarse = seen.count((18, 24))
    assert coarse >= 2 and set(seen[:coarse]) == {(18, 24)} and set(seen[coarse:]) == {(36, 48)}
    assert result.image.shape == (36, 48, 3) and len(result.history) == len(seen) - coarse


def test_runtime_never_imports_tensorflow():
    code = ("import sys, facedoor_stylize.cli, facedoor_stylize.engine\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'tensorflow', 'keras', 'tf2onnx'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
