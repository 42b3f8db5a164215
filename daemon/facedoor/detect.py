"""Face detection: one interface, two detectors.

`MTCNNDetector` runs the three exported MTCNN nets (P-Net on an image pyramid, R-Net and O-Net
on batched candidate crops) on ONNX Runtime, with NMS and box regression in vectorised numpy,
following the conventions of the `mtcnn==1.0.0` package the weights come from (RGB, (x-127.5)/128,
row-major HxW images, pyramid factor 0.709, 12-pixel P-Net cells with stride 2). `YuNetDetector`
wraps OpenCV's `cv2.FaceDetectorYN`. Both return `Face`s with a box, a score and 5 landmarks in
image pixels, ordered left eye, right eye, nose, left mouth corner, right mouth corner (image
left/right), largest face first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import ArrayLike

from facedoor.models import Manifest, ModelEntry, ModelError

log = logging.getLogger(__name__)


@dataclass
class Face:
    """One detected face; `embedding` is filled by `FacePipeline.encode`."""

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, mouth left, mouth right
    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels: what `min_face_size` is compared with."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


class Detector(Protocol):
    name: str

    def detect(self, image_bgr: np.ndarray, min_face_size: int) -> list[Face]:
        """Faces of at least MIN_FACE_SIZE pixels, largest first."""
        ...


def _to_faces(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, min_face_size: float) -> list[Face]:
    faces = [
        Face(box=b.astype(np.float32), score=float(s), landmarks=lm.astype(np.float32))
        for b, s, lm in zip(boxes, scores, landmarks)
    ]
    faces = [f for f in faces if f.size >= min_face_size]
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


# -- numpy helpers ------------------------------------------------------------------------------

def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union",
        groups: np.ndarray | None = None, block: int = 128) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    METHOD "union" is IoU, "min" divides the intersection by the smaller area (MTCNN's O-Net stage).
    With GROUPS (one label per box), a box only suppresses boxes of its own group: one call
    does what a call per group would (P-Net's per-scale stage).
    The greedy pass runs on the overlap matrix of the next BLOCK boxes, then drops the later boxes
    the kept ones suppress: the same boxes as one box at a time, with a few numpy calls per block
    rather than ten per kept box, and memory bounded by BLOCK times the number of boxes."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)

    def suppresses(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(len(ROWS), len(COLS)) overlap > THRESHOLD, ROWS the earlier (better) boxes."""
        w = np.maximum(0.0, np.minimum(x2[rows, None], x2[cols]) - np.maximum(x1[rows, None], x1[cols]))
        h = np.maximum(0.0, np.minimum(y2[rows, None], y2[cols]) - np.maximum(y1[rows, None], y1[cols]))
        inter = w * h
        first, later = areas[rows, None], areas[cols]
        denom = np.minimum(first, later) if method == "min" else first + later - inter
        over = inter / np.maximum(denom, 1e-9) > threshold
        return over if groups is None else over & (groups[rows, None] == groups[cols])

    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        head, order = order[:block], order[block:]
        over = suppresses(head, head)
        gone = np.zeros(len(head), dtype=bool)
        kept = []
        for i in range(len(head)):
            if not gone[i]:
                kept.append(i)
                gone |= over[i]
        winners = head[kept]
        keep.extend(winners.tolist())
        if order.size:
            order = order[~suppresses(winners, order).any(axis=0)]
    return np.asarray(keep, dtype=np.int64)


def square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares of their longer side around the same centre."""
    out = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + 0.5 * (w - side)
    out[:, 1] = boxes[:, 1] + 0.5 * (h - side)
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def crop_and_resize(image: np.ndarray, boxes: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    """(N, size, size, C) float32 bilinear crops of IMAGE (H, W, C) at BOXES, FILL outside the image.

    Samples like `tf.image.crop_and_resize` with boxes normalised by the image size, as the
    `mtcnn` package does, so the nets see the crops they were used with: sample j of a box runs
    from x1 to x2 in SIZE steps, scaled by (W - 1) / W, and a sample outside [0, W - 1] is FILL.
    Each crop is one `cv2.warpAffine` (bilinear weights in OpenCV's 1/32 steps), ten times
    faster than gathering the four neighbours of every sample in numpy."""
    h, w = image.shape[:2]
    src = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty((len(boxes), size, size, image.shape[2]), dtype=np.float32)
    sx, sy = (w - 1) / w, (h - 1) / h
    step = 1.0 / max(size - 1, 1)
    x1, y1, x2, y2 = boxes.astype(np.float64).T
    matrices = np.zeros((len(boxes), 2, 3))  # all at once: building one per box took as long as its warp
    matrices[:, 0, 0], matrices[:, 0, 2] = (x2 - x1) * sx * step, x1 * sx
    matrices[:, 1, 1], matrices[:, 1, 2] = (y2 - y1) * sy * step, y1 * sy
    for crop, matrix in zip(out, matrices):
        cv2.warpAffine(src, matrix, (size, size), crop, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                       borderMode=cv2.BORDER_REPLICATE)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x1, y1, x2, y2 = (boxes[:, k : k + 1].astype(np.float32) for k in range(4))
    ys = (y1 + (y2 - y1) * t) * sy  # (N, S) sample positions, as TF computes them
    xs = (x1 + (x2 - x1) * t) * sx
    out[~((ys >= 0) & (ys <= h - 1))] = np.float32(fill)  # sample rows outside the image
    out.transpose(0, 2, 1, 3)[~((xs >= 0) & (xs <= w - 1))] = np.float32(fill)  # and columns
    return out


# -- MTCNN ---------------------------------------------------------------------------------------

class _Net:
    """One MTCNN net: its ORT session, input layout and output roles (by their last dimension)."""

    def __init__(self, manifest: Manifest, name: str, threads: int | None, layout_optimization: bool = False):
        self.entry: ModelEntry = manifest.entry(name)
        self.session = manifest.session(name, threads, layout_optimization=layout_optimization)
        self.input_name = self.entry.input_name
        self.nchw = self.entry.layout == "NCHW"
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dims = [o.shape[-1] for o in self.session.get_outputs()]

    def __call__(self, batch: np.ndarray) -> dict[int, np.ndarray]:
        """Run on an NHWC batch; outputs keyed by last dimension (2 scores, 4 box, 10 landmarks)."""
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if self.nchw else batch, dtype=np.float32)
        outputs = self.session.run(self.output_names, {self.input_name: x})
        result = {}
        for out in outputs:
            if self.nchw and out.ndim == 4:
                out = out.transpose(0, 2, 3, 1)
            result[out.shape[-1]] = out
        return result


class MTCNNDetector:
    """MTCNN (P-Net, R-Net, O-Net) on ONNX Runtime with numpy pre- and post-processing."""

    name = "mtcnn"
    scale_factor = 0.709
    thresholds = (0.6, 0.7, 0.7)
    nms_thresholds = (0.5, 0.7, 0.7, 0.7)  # P-Net per scale, P-Net across scales, R-Net, O-Net (min)
    max_candidates = (2000, 300)  # best P-Net / R-Net boxes passed on: bounds the time on busy scenes

    def __init__(self, manifest: Manifest, threads: int | None = None, score_threshold: float = 0.9):
        self.pnet = _Net(manifest, "mtcnn_pnet", threads)
        # R-Net and O-Net gain from ORT's NCHWc layout (1 thread: 6.2 vs 7.2 ms, 2.6 vs 4.2 ms); P-Net does not
        self.rnet = _Net(manifest, "mtcnn_rnet", threads, layout_optimization=True)
        self.onet = _Net(manifest, "mtcnn_onet", threads, layout_optimization=True)
        pre = self.pnet.entry.preprocessing
        self.rgb = pre.color.upper() == "RGB"
        if pre.normalize != "affine":
            raise ModelError(f"mtcnn_pnet: unsupported preprocessing {pre.normalize!r} (expected affine)")
        # one scalar when the channels share it: numpy runs a 3-vector over (..., 3) pixels 5x slower
        self.mean = np.float32(pre.mean[0]) if len(set(pre.mean)) == 1 else np.asarray(pre.mean, dtype=np.float32)
        self.scale = np.float32(pre.scale)
        self.fill = float(np.mean(pre.mean))  # outside the image: 0 after normalisation, as in mtcnn
        self.score_threshold = score_threshold

    def _normalize(self, bgr: np.ndarray) -> np.ndarray:
        """Float32 BGR pixels (H, W, 3) or (N, S, S, 3) -> net input: the manifest's channel order, (x - mean) * scale.

        The frame itself is never converted to RGB: only the small pyramid levels and crops are
        (resizing and cropping treat channels alike, so the values are the same)."""
        flat = bgr.reshape(-1, bgr.shape[-2], bgr.shape[-1])  # cvtColor takes crops as one (N*S, S, 3) image
        x = cv2.cvtColor(flat, cv2.COLOR_BGR2RGB) if self.rgb else flat
        return ((x - self.mean) * self.scale).reshape(bgr.shape)

    def _crops(self, pixels: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
        """Normalised SIZE x SIZE crops of PIXELS (the float32 BGR frame), FILL outside it."""
        return self._normalize(crop_and_resize(pixels, boxes, size, fill=self.fill))

    def detect(self, image_bgr: np.ndarray, min_face_size: int = 40) -> list[Face]:
        pixels = image_bgr.astype(np.float32)  # converted once for the pyramid and the crops
        boxes = self._stage1(pixels, min_face_size)
        if len(boxes) == 0:
            return []
        boxes = self._stage2(pixels, boxes)
        if len(boxes) == 0:
            return []
        boxes, scores, landmarks = self._stage3(pixels, boxes)
        keep = scores >= self.score_threshold
        return _to_faces(boxes[keep], scores[keep], landmarks[keep], min_face_size)

    def _scales(self, height: int, width: int, min_face_size: int) -> list[float]:
        scale = 12.0 / max(min_face_size, 12)
        shortest = min(height, width) * scale
        scales = []
        while shortest >= 12:
            scales.append(scale)
            scale *= self.scale_factor
            shortest *= self.scale_factor
        return scales

    def _stage1(self, pixels: np.ndarray, min_face_size: int) -> np.ndarray:
        """P-Net over the pyramid of PIXELS (the float32 BGR frame) in one ORT call: candidate boxes
        (N, 5: x1 y1 x2 y2 score), squared."""
        h, w = pixels.shape[:2]
        levels = []
        level = pixels
        for scale in self._scales(h, w, min_face_size):
            size = (max(int(np.ceil(w * scale)), 12), max(int(np.ceil(h * scale)), 12))
            # each level from the previous one: area-averaging the full frame 8 times costs more
            # than the nets themselves. OpenCV's float32 area resize, rounded, gives the very levels
            # of its uint8 one (the pyramid MTCNN is used with; tests/test_detect.py) in 1.0
            # instead of 1.4 ms for a 640x480 frame
            level = np.rint(cv2.resize(level, size, interpolation=cv2.INTER_AREA))
            levels.append((scale, level))
        if not levels:
            return np.zeros((0, 5), dtype=np.float32)
        # normalised level by level (the canvas is a quarter larger), the gaps filled with normalised FILL
        fill = (np.float32(self.fill) - self.mean) * self.scale
        canvas, offsets = mosaic([self._normalize(lv) for _, lv in levels], fill)
        out = self.pnet(canvas[None])
        prob, reg = out[2][0, :, :, 1], out[4][0]
        # which level each output cell belongs to (-1: gap or fill); a level's cells: 3x3 conv,
        # 2x2 max-pool (stride 2, padded at the end), two 3x3 convs
        owner = np.full(prob.shape, -1, dtype=np.int64)
        for i, ((_, lv), (ox, oy)) in enumerate(zip(levels, offsets)):
            owner[oy // 2 : oy // 2 + (lv.shape[0] - 1) // 2 - 4, ox // 2 : ox // 2 + (lv.shape[1] - 1) // 2 - 4] = i
        ys, xs = np.nonzero((prob > self.thresholds[0]) & (owner >= 0))
        if ys.size == 0:
            return np.zeros((0, 5), dtype=np.float32)
        level = owner[ys, xs]
        origin = np.asarray(offsets)[level] // 2  # the level's first cell (x, y)
        cx, cy = (xs - origin[:, 0]) * 2, (ys - origin[:, 1]) * 2  # cell corners in the level's pixels
        cells = np.stack([cx, cy, cx + 12, cy + 12], axis=1).astype(np.float32)
        scales = np.asarray([scale for scale, _ in levels], dtype=np.float32)[level, None]
        cand = np.concatenate([(cells + reg[ys, xs] * 12.0) / scales, prob[ys, xs, None]], axis=1)
        keep = nms(cand[:, :4], cand[:, 4], self.nms_thresholds[0], groups=level)
        # level after level (each best first), the order the scales were once merged in
        cand = cand[keep[np.argsort(level[keep], kind="stable")]]
        cand = cand[nms(cand[:, :4], cand[:, 4], self.nms_thresholds[1])][: self.max_candidates[0]]
        cand[:, :4] = square(cand[:, :4])
        return cand

    def _stage2(self, pixels: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """R-Net on all candidates in one batch: refined, squared boxes (N, 5)."""
        out = self.rnet(self._crops(pixels, cand[:, :4], 24))
        scores, reg = out[2][:, 1], out[4]
        keep = scores > self.thresholds[1]
        boxes = _regress(cand[keep, :4], reg[keep])
        scores = scores[keep]
        order = nms(boxes, scores, self.nms_thresholds[2])[: self.max_candidates[1]]
        return np.concatenate([square(boxes[order]), scores[order, None]], axis=1)

    def _stage3(self, pixels: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """O-Net on all candidates in one batch: boxes (N, 4), scores (N,), landmarks (N, 5, 2)."""
        out = self.onet(self._crops(pixels, cand[:, :4], 48))
        scores, reg, marks = out[2][:, 1], out[4], out[10]
        box = cand[:, :4]
        w = (box[:, 2] - box[:, 0] + 1)[:, None]
        h = (box[:, 3] - box[:, 1] + 1)[:, None]
        lx = w * marks[:, 0:5] + box[:, 0:1] - 1
        ly = h * marks[:, 5:10] + box[:, 1:2] - 1
        landmarks = np.stack([lx, ly], axis=2)
        keep = scores > self.thresholds[2]
        boxes = _regress(box[keep], reg[keep])
        scores, landmarks = scores[keep], landmarks[keep]
        order = nms(boxes, scores, self.nms_thresholds[3], method="min")
        return boxes[order], scores[order], landmarks[order]


def mosaic(levels: list[np.ndarray], fill: ArrayLike, gap: int = 2) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """LEVELS (largest first) packed into one image for a single P-Net run, and each one's (x, y).

    The largest level takes the left; the others are stacked in columns to its right. Offsets
    are even (P-Net's stride) and levels are GAP pixels apart, filled with FILL (0 after
    normalisation), so every cell of a level sees only that level: the same cells as running
    the level alone, except on an odd side, where the lone run's max-pool pads the last window
    and here it sees FILL."""
    height = levels[0].shape[0]
    offsets = [(0, 0)]
    x, y, column = _even(levels[0].shape[1] + gap), 0, 0
    for level in levels[1:]:
        lh, lw = level.shape[:2]
        if y and y + lh > height:
            x, y, column = _even(x + column + gap), 0, 0
        offsets.append((x, y))
        y = _even(y + lh + gap)
        column = max(column, lw)
    width = max(ox + lv.shape[1] for lv, (ox, _) in zip(levels, offsets))
    height = max(oy + lv.shape[0] for lv, (_, oy) in zip(levels, offsets))
    canvas = np.full((height, width, levels[0].shape[2]), fill, dtype=np.float32)
    for level, (ox, oy) in zip(levels, offsets):
        canvas[oy : oy + level.shape[0], ox : ox + level.shape[1]] = level
    return canvas, offsets


def _even(value: int) -> int:
    return value + (value & 1)


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply R/O-Net box offsets (fractions of the box's +1 width/height)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + reg * np.stack([w, h, w, h], axis=1)


# -- YuNet ---------------------------------------------------------------------------------------

class YuNetDetector:
    """OpenCV's YuNet (`cv2.FaceDetectorYN`); the model file is configured, not in the manifest."""

    name = "yunet"

    def __init__(self, model: Path, score_threshold: float = 0.6, nms_threshold: float = 0.3,
                 threads: int | None = None):
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"YuNet model {model} not found (recognition.yunet_model)")
        try:
            self._net = cv2.FaceDetectorYN.create(str(model), "", (320, 320), score_threshold, nms_threshold, 5000)
        except cv2.error as exc:
            raise ModelError(f"YuNet model {model}: OpenCV cannot load it ({exc})") from exc
        if threads:
            cv2.setNumThreads(threads)
        self._size: tuple[int, int] = (320, 320)
        self.model = model

    def detect(self, image_bgr: np.ndarray, min_face_size: int = 40) -> list[Face]:
        h, w = image_bgr.shape[:2]
        if (w, h) != self._size:
            self._net.setInputSize((w, h))
            self._size = (w, h)
        _, rows = self._net.detect(image_bgr)
        if rows is None or len(rows) == 0:
            return []
        rows = np.asarray(rows, dtype=np.float32)
        boxes = np.concatenate([rows[:, 0:2], rows[:, 0:2] + rows[:, 2:4]], axis=1)
        # YuNet: right eye, left eye, nose, right mouth corner, left mouth corner (the subject's),
        # i.e. image-left first: the same order as MTCNN.
        landmarks = rows[:, 4:14].reshape(-1, 5, 2)
        return _to_faces(boxes, rows[:, 14], landmarks, min_face_size)


def create_detector(recognition: Any, min_score: float, manifest: Manifest, threads: int | None = None) -> Detector:
    """The detector the `recognition` config section asks for; MTCNN keeps faces scoring MIN_SCORE or more."""
    if recognition.detector == "yunet":
        return YuNetDetector(recognition.yunet_model, threads=threads)
    return MTCNNDetector(manifest, threads, min_score)
