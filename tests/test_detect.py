"""Face detection: numpy helpers, MTCNN on ONNX Runtime against the `mtcnn` package, YuNet."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.detect import (
    Face,
    MTCNNDetector,
    YuNetDetector,
    _regress,
    _to_faces,
    crop_and_resize,
    mosaic,
    nms,
    square,
)
from facedoor.models import Manifest, ModelError


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Non-maximum suppression one box at a time, as first written (the oracle)."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        denom = np.minimum(areas[i], areas[rest]) if method == "min" else areas[i] + areas[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-9) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def test_nms_keeps_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2, 3]
    # "min": a small box inside a big one is suppressed even though their IoU is low
    nested = np.array([[0, 0, 100, 100], [10, 10, 30, 30]], np.float32)
    assert nms(nested, np.array([0.9, 0.8]), 0.7, "min").tolist() == [0]
    assert nms(nested, np.array([0.9, 0.8]), 0.7, "union").tolist() == [0, 1]
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0), 0.5).size == 0


def test_nms_keeps_what_one_box_at_a_time_keeps() -> None:
    """Block-wise NMS, and NMS by group, keep exactly the boxes of greedy NMS, in the same order,
    with identical boxes, touching boxes and tied scores."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(1, 300))
        corner = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        boxes = np.concatenate([corner, corner + rng.uniform(1, 60, (n, 2)).astype(np.float32)], axis=1)
        boxes = np.round(boxes) if trial % 2 else boxes
        scores = rng.uniform(0, 1, n).astype(np.float32).round(trial % 3 + 1)
        groups = rng.integers(0, 4, n)
        for method, threshold in (("union", 0.5), ("min", 0.7)):
            expected = _greedy_nms(boxes, scores, threshold, method).tolist()
            assert nms(boxes, scores, threshold, method, block=int(rng.integers(1, 200))).tolist() == expected
            by_group = [np.flatnonzero(groups == g)[_greedy_nms(boxes[groups == g], scores[groups == g], threshold,
                                                                method)] for g in range(4)]
            expected = sorted(np.concatenate(by_group).tolist(), key=lambda i: (-scores[i], i))
            assert nms(boxes, scores, threshold, method, groups=groups).tolist() == expected


def test_square_keeps_centre() -> None:
    sq = square(np.array([[10, 20, 30, 60]], np.float32))
    np.testing.assert_allclose(sq, [[0, 20, 40, 60]])


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """IMAGE sampled at rows YS x columns XS (inside the image), edge pixels repeated beyond."""
    h, w = image.shape[:2]
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    return (image[y0][:, x0] * (1 - fy) * (1 - fx) + image[y0][:, x1] * (1 - fy) * fx
            + image[y1][:, x0] * fy * (1 - fx) + image[y1][:, x1] * fy * fx)


def test_crop_and_resize_matches_a_plain_resize_and_pads_with_zero() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(50, 40, 3)).astype(np.float32)
    whole = crop_and_resize(image, np.array([[0, 0, 40, 50]], np.float32), 24)[0]
    # tf.image.crop_and_resize with boxes normalised by the image size: the whole-image box
    # samples from the first to the last pixel centre
    ref = _bilinear(image, np.linspace(0, 49, 24), np.linspace(0, 39, 24))
    # OpenCV's bilinear warp places samples in 1/32-pixel steps: off by at most 1/64 of a pixel
    step = max(np.abs(np.diff(image, axis=0)).max(), np.abs(np.diff(image, axis=1)).max())
    np.testing.assert_allclose(whole, ref, atol=step / 64 + 1e-4)
    outside = crop_and_resize(image, np.array([[-100, -100, -60, -60]], np.float32), 12)
    assert np.all(outside == 0)
    # a box over the left and bottom edges: the sample rows and columns outside are FILL, the rest
    # bilinear samples; with a box inside the image in the same batch
    boxes = np.array([[-20, 10, 20, 70], [0, 0, 40, 50]], np.float32)
    part, again = crop_and_resize(image, boxes, 24, fill=7.0)
    np.testing.assert_array_equal(again, whole)
    ys, xs = np.linspace(10, 70, 24) * 49 / 50, np.linspace(-20, 20, 24) * 39 / 40
    inside = (ys <= 49)[:, None] & (xs >= 0)[None, :]
    assert np.all(part[~inside] == 7.0) and 0 < inside.sum() < inside.size
    np.testing.assert_allclose(part[inside], _bilinear(image, ys[ys <= 49], xs[xs >= 0]).reshape(-1, 3),
                               atol=step / 64 + 1e-4)


@pytest.fixture(scope="module")
def manifest(real_models: Path) -> Manifest:
    return Manifest.load(real_models)


@pytest.fixture(scope="module")
def lfw_images(shared_dir: Path) -> list[np.ndarray]:
    paths = sorted((shared_dir / "data/faces/lfw10").glob("*/*_0002.jpg"))
    return [cv2.imread(str(p)) for p in paths]


def _check_face_geometry(face) -> None:
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert lx < nx < rx and mlx < mrx  # image-left eye / mouth corner first
    assert max(ly, ry) < ny < min(mly, mry)  # eyes above nose above mouth
    x1, y1, x2, y2 = face.box
    assert x1 < lx and rx < x2 and y1 < ly and max(mly, mry) < y2


def test_mtcnn_finds_the_lfw_face_with_landmarks(manifest: Manifest, lfw_images: list[np.ndarray]) -> None:
    detector = MTCNNDetector(manifest)
    for image in lfw_images:
        faces = detector.detect(image, 40)
        assert faces, "no face"
        face = faces[0]
        assert face.score >= 0.9 and face.landmarks.shape == (5, 2) and face.box.dtype == np.float32
        _check_face_geometry(face)
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        assert abs(cx - 125) < 30 and abs(cy - 125) < 40  # LFW crops are centred on the face
        assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)


def test_mtcnn_matches_the_mtcnn_package(manifest: Manifest, lfw_images: list[np.ndarray]) -> None:
    """Same boxes and landmarks as the `mtcnn` wheel the weights come from (TensorFlow, export extra)."""
    mtcnn = pytest.importorskip("mtcnn", reason="the export extra (mtcnn, TensorFlow) is not installed")
    reference = mtcnn.MTCNN()
    detector = MTCNNDetector(manifest)
    for image in lfw_images[:4]:
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        # (the package's own pyramid breaks on 250x250 with min_face_size 40: compare at its default 20)
        ref = max(reference.detect_faces(rgb, box_format="xyxy", threshold_onet=0.7, min_face_size=20),
                  key=lambda r: (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]))
        ours = detector.detect(image, 20)[0]
        # The package's pyramid rounding, TF's AREA resize and its all-pairs NMS differ slightly
        # from ours: a few pixels on a ~100 px face, far from a different detection.
        side = ref["box"][2] - ref["box"][0]
        np.testing.assert_allclose(ours.box, ref["box"], atol=0.08 * side)
        kp = ref["keypoints"]
        ref_marks = [kp[k] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")]
        np.testing.assert_allclose(ours.landmarks, ref_marks, atol=0.04 * side)
        assert ours.score == pytest.approx(ref["confidence"], abs=0.02)


def test_mtcnn_and_yunet_agree(manifest: Manifest, lfw_images: list[np.ndarray], shared_dir: Path) -> None:
    mtcnn = MTCNNDetector(manifest)
    yunet = YuNetDetector(shared_dir / "models/yunet/face_detection_yunet_2023mar.onnx")
    for image in lfw_images:
        a, b = mtcnn.detect(image, 40)[0], yunet.detect(image, 40)[0]
        _check_face_geometry(b)
        eye_dist = np.linalg.norm(a.landmarks[0] - a.landmarks[1])
        assert np.abs(a.landmarks - b.landmarks).max() < 0.35 * eye_dist


def test_nothing_on_a_faceless_image_and_min_size_is_honoured(manifest: Manifest, lfw_images, shared_dir) -> None:
    detectors = [MTCNNDetector(manifest), YuNetDetector(shared_dir / "models/yunet/face_detection_yunet_2023mar.onnx")]
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    frame = np.full((480, 640, 3), 90, np.uint8)
    small = cv2.resize(lfw_images[0], (125, 125), interpolation=cv2.INTER_AREA)  # face ~50 px
    frame[300:425, 400:525] = small
    for det in detectors:
        assert det.detect(noise, 40) == [], det.name
        faces = det.detect(frame, 40)
        assert len(faces) == 1 and 400 < faces[0].box[0] < faces[0].box[2] < 525, det.name
        assert det.detect(frame, 120) == [], det.name


def test_mosaic_places_levels_apart_on_even_offsets() -> None:
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in ((75, 101), (54, 72), (38, 51), (27, 36),
                                                                              (19, 26), (14, 18))]
    canvas, offsets = mosaic(levels, 127.5)
    boxes = []
    for level, (x, y) in zip(levels, offsets):
        assert x % 2 == 0 and y % 2 == 0
        np.testing.assert_array_equal(canvas[y : y + level.shape[0], x : x + level.shape[1]], level)
        boxes.append((x, y, x + level.shape[1], y + level.shape[0]))
    for i, a in enumerate(boxes):  # at least 2 px apart: no 12-px P-Net window spans two levels
        for b in boxes[i + 1 :]:
            assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]
    assert canvas.shape[0] == 75


def _per_level_stage1(detector: MTCNNDetector, pixels: np.ndarray, min_face_size: int) -> np.ndarray:
    """The pyramid as it ran before the mosaic: one P-Net call per level of the uint8 pyramid (the oracle)."""
    h, w = pixels.shape[:2]
    found, level = [], pixels.astype(np.uint8)
    for scale in detector._scales(h, w, min_face_size):
        level = cv2.resize(level, (max(int(np.ceil(w * scale)), 12), max(int(np.ceil(h * scale)), 12)),
                           interpolation=cv2.INTER_AREA)
        out = detector.pnet(detector._normalize(level)[None])
        prob, reg = out[2][0, :, :, 1], out[4][0]
        ys, xs = np.nonzero(prob > detector.thresholds[0])
        if ys.size:
            cells = np.stack([xs * 2, ys * 2, xs * 2 + 12, ys * 2 + 12], axis=1).astype(np.float32)
            cand = np.concatenate([(cells + reg[ys, xs] * 12.0) / scale, prob[ys, xs, None]], axis=1)
            found.append(cand[nms(cand[:, :4], cand[:, 4], detector.nms_thresholds[0])])
    if not found:
        return np.zeros((0, 5), np.float32)
    cand = np.concatenate(found)
    cand = cand[nms(cand[:, :4], cand[:, 4], detector.nms_thresholds[1])][: detector.max_candidates[0]]
    cand[:, :4] = square(cand[:, :4])
    return cand


def test_one_pnet_call_finds_the_faces_of_one_call_per_level(manifest: Manifest, shared_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Same faces, boxes and landmarks as the per-level pyramid on real photos (LFW, NUAA 640x480).

    Cells inside a level are bit-identical; only the last cell row/column of an odd-sized level
    differs (the lone run pads the max-pool there), which can move a box by a few pixels."""
    paths = sorted((shared_dir / "data/faces/lfw10").glob("*/*.jpg"))[::5]
    paths += sorted((shared_dir / "data/antispoof/nuaa/live").glob("*.jpg"))[:10]
    images = [cv2.imread(str(p)) for p in paths]
    detector = MTCNNDetector(manifest)
    calls = []
    original = detector.pnet.session.run
    monkeypatch.setattr(detector.pnet.session, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    new = [detector.detect(image, 40) for image in images]
    assert len(calls) == len(images), "one P-Net call per frame"
    monkeypatch.setattr(detector, "_stage1", lambda pixels, m: _per_level_stage1(detector, pixels, m))
    old = [detector.detect(image, 40) for image in images]
    for a, b in zip(old, new):
        assert len(a) == len(b)
        for fa, fb in zip(a, b):
            side = fa.box[2] - fa.box[0]
            np.testing.assert_allclose(fb.box, fa.box, atol=0.08 * side)
            np.testing.assert_allclose(fb.landmarks, fa.landmarks, atol=0.04 * side)
            assert fb.score == pytest.approx(fa.score, abs=0.02)


def _plain_crops(rgb: np.ndarray, boxes: np.ndarray, size: int, fill: float) -> np.ndarray:
    """R-/O-Net crops as first written: one warp per box from the float RGB frame, a mask after."""
    h, w = rgb.shape[:2]
    src = rgb.astype(np.float32)
    out = np.empty((len(boxes), size, size, 3), dtype=np.float32)
    sx, sy = (w - 1) / w, (h - 1) / h
    step = 1.0 / (size - 1)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        matrix = np.array([[(x2 - x1) * sx * step, 0.0, x1 * sx], [0.0, (y2 - y1) * sy * step, y1 * sy]])
        cv2.warpAffine(src, matrix, (size, size), out[i], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x1, y1, x2, y2 = (boxes[:, k : k + 1].astype(np.float32) for k in range(4))
    ys, xs = (y1 + (y2 - y1) * t) * sy, (x1 + (x2 - x1) * t) * sx
    inside = ((ys >= 0) & (ys <= h - 1))[:, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, :]
    out[~inside] = np.float32(fill)
    return out


def _plain_detect(det: MTCNNDetector, image_bgr: np.ndarray, min_face_size: int) -> list[Face]:
    """MTCNN around the same nets as first written, the oracle of the faster numpy: an RGB copy of
    the frame and its uint8 pyramid normalised by a 3-vector, P-Net candidates and NMS level by
    level, greedy NMS, crops one box at a time."""
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    pre = det.pnet.entry.preprocessing
    mean, scale, fill = np.asarray(pre.mean, np.float32), np.float32(pre.scale), float(np.mean(pre.mean))
    h, w = rgb.shape[:2]
    levels, level = [], rgb
    for s in det._scales(h, w, min_face_size):
        level = cv2.resize(level, (max(int(np.ceil(w * s)), 12), max(int(np.ceil(h * s)), 12)),
                           interpolation=cv2.INTER_AREA)
        levels.append((s, level))
    canvas, offsets = mosaic([lv for _, lv in levels], fill)
    out = det.pnet(((canvas - mean) * scale)[None])
    found = []
    for (s, lv), (ox, oy) in zip(levels, offsets):
        rows, cols = (lv.shape[0] - 1) // 2 - 4, (lv.shape[1] - 1) // 2 - 4
        prob = out[2][0, oy // 2 : oy // 2 + rows, ox // 2 : ox // 2 + cols, 1]
        ys, xs = np.nonzero(prob > det.thresholds[0])
        cells = np.stack([xs * 2, ys * 2, xs * 2 + 12, ys * 2 + 12], axis=1).astype(np.float32)
        cand = np.concatenate([(cells + out[4][0, oy // 2 + ys, ox // 2 + xs] * 12.0) / s, prob[ys, xs, None]], axis=1)
        found.append(cand[_greedy_nms(cand[:, :4], cand[:, 4], det.nms_thresholds[0])])
    cand = np.concatenate(found)
    cand = cand[_greedy_nms(cand[:, :4], cand[:, 4], det.nms_thresholds[1])][: det.max_candidates[0]]
    if not len(cand):
        return []
    out = det.rnet((_plain_crops(rgb, square(cand[:, :4]), 24, fill) - mean) * scale)
    keep = out[2][:, 1] > det.thresholds[1]
    boxes, scores = _regress(square(cand[:, :4])[keep], out[4][keep]), out[2][keep, 1]
    boxes = square(boxes[_greedy_nms(boxes, scores, det.nms_thresholds[2])[: det.max_candidates[1]]])
    if not len(boxes):
        return []
    out = det.onet((_plain_crops(rgb, boxes, 48, fill) - mean) * scale)
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1
    landmarks = np.stack([size[:, :1] * out[10][:, 0:5] + boxes[:, 0:1] - 1,
                          size[:, 1:] * out[10][:, 5:10] + boxes[:, 1:2] - 1], axis=2)
    keep = out[2][:, 1] > det.thresholds[2]
    boxes, scores, landmarks = _regress(boxes[keep], out[4][keep]), out[2][keep, 1], landmarks[keep]
    order = _greedy_nms(boxes, scores, det.nms_thresholds[3], "min")
    final = scores[order] >= det.score_threshold
    return _to_faces(boxes[order][final], scores[order][final], landmarks[order][final], min_face_size)


def _door_frames(shared_dir: Path, count: int) -> list[np.ndarray]:
    """640x480 frames like benchmarks/pipeline.py's: an LFW face at door distance on a scene."""
    rng = np.random.default_rng(0)
    scenes = [cv2.resize(cv2.imread(str(p)), (640, 480), interpolation=cv2.INTER_AREA)
              for p in sorted((shared_dir / "data/nst").glob("*.jp*g"))[:count]]
    people = sorted((shared_dir / "data/faces/lfw10").glob("*/*.jpg"))
    frames = []
    for scene in scenes:
        face = cv2.imread(str(people[int(rng.integers(len(people)))]))[25:225, 25:225]
        side = int(rng.integers(180, 260))
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
        scene[y : y + side, x : x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
        frames.append(scene)
    return frames


def test_mtcnn_gives_exactly_the_faces_of_the_plain_implementation(manifest: Manifest, shared_dir: Path) -> None:
    """The faster numpy around the nets (no RGB copy of the frame, the pyramid resized in float32 and
    rounded, a scalar mean, all P-Net levels' candidates and NMS at once, NMS on overlap matrices,
    crop matrices built together) finds bit-identical boxes, scores and landmarks: on door-camera
    frames, NUAA webcam frames (bystanders cut by the frame's edge) and LFW photos, at the camera's
    and the stills' smallest face sizes."""
    images = _door_frames(shared_dir, 8)
    images += [cv2.imread(str(p)) for p in sorted((shared_dir / "data/antispoof/nuaa/live").glob("*.jpg"))[::20]]
    images += [cv2.imread(str(p)) for p in sorted((shared_dir / "data/faces/lfw10").glob("*/*.jpg"))[::7]]
    detector = MTCNNDetector(manifest, threads=1)
    found = 0
    for image in images:
        for min_face_size in (40, 20):
            ours, plain = detector.detect(image, min_face_size), _plain_detect(detector, image, min_face_size)
            assert len(ours) == len(plain)
            for a, b in zip(ours, plain):
                np.testing.assert_array_equal(a.box, b.box)
                np.testing.assert_array_equal(a.landmarks, b.landmarks)
                assert a.score == b.score
            found += len(ours)
    assert found >= 2 * len(images)


def test_yunet_missing_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        YuNetDetector(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot load"):
        YuNetDetector(bad)
