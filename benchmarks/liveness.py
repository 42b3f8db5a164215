"""Liveness gate (MiniFASNet V2 + V1SE) on the spoof data in ../shared: APCER / BPCER per frame and per track.

Sources: NUAA (16 people, webcam; live vs hand-held printed photos) and the replay videos (two
other people; live webcam video vs a replay of it on a phone or monitor). Faces come from
facedoor's MTCNN (or YuNet). Everything tuned here is tuned on the NUAA *calibration* people (odd
subject ids) only: the crop calibration (scale and vertical shift of the detector's box, kept only
when it cuts their log-loss by 10 %) and the threshold (the centre of the range where their
per-track APCER and BPCER are both <= 5 %). The table reports the other NUAA people and the video
people, none of whom were seen while tuning. The planar-motion cue is measured (AUC), not used.

A track is what the door sees of one person: consecutive frames of one video (--video-track
frames, every --video-step-th frame), or consecutive photos of one NUAA subject/session
(--nuaa-track photos, in file order). Its score is the mean live score of its frames (`TrackLiveness`).
APCER = attack tracks/frames accepted as live; BPCER = live tracks/frames rejected.

    .venv/bin/python benchmarks/liveness.py [--models models] [--detector mtcnn|yunet] [--antispoof-dir DIR]

--models holds the MTCNN export (YuNet comes from ../shared/models/yunet); the MiniFASNet ONNX
files are read from --antispoof-dir (default ../shared/models/antispoof). Detections and scores
are cached in benchmarks/results/ (git-ignored), where the DET curve PNG is written too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from facedoor.detect import Detector, MTCNNDetector, YuNetDetector
from facedoor.liveness import MODEL_SCALES, BoxCalibration, LivenessModel, TrackLiveness
from facedoor.models import Manifest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks/results"
YUNET = SHARED / "models/yunet/face_detection_yunet_2023mar.onnx"
FILES = {"antispoof_v2": "MiniFASNetV2.onnx", "antispoof_v1se": "MiniFASNetV1SE.onnx"}
BPCER_BUDGET = 0.05
SCALE_GRID = (0.8, 1.0, 1.25)
SHIFT_GRID = (-0.1, 0.0, 0.1)
MIN_GAIN = 0.1


@dataclass
class Sample:
    """One detected face: where it comes from, its label and its track."""

    source: str  # "nuaa" or "video"
    attack: str  # "print", "replay" or "live"
    person: str
    track: str
    key: str  # file path, or "video path#frame"
    box: list[float]
    landmarks: list[list[float]]  # (5, 2): eyes, nose, mouth corners

    @property
    def live(self) -> bool:
        """A bona fide face (not an attack)."""
        return self.attack == "live"


def load_image(path: str) -> np.ndarray:
    """The BGR image at PATH; an error naming it when it cannot be read."""
    image = cv2.imread(path)
    if image is None:
        raise RuntimeError(f"cannot read {path}")
    return image


def iter_frames(data: Path, nuaa_track: int, video_track: int,
                video_step: int) -> Iterator[tuple[str, str, str, str, str, np.ndarray | None]]:
    """(source, attack, person, track, key, image) of every NUAA photo and every VIDEO_STEP-th video frame."""
    for folder, attack in (("live", "live"), ("print", "print")):
        groups: dict[str, list[Path]] = {}
        for path in (data / "nuaa" / folder).glob("*.jpg"):
            subject, _, _, _, session, _ = path.stem.split("_")  # subject_ID_glasses_pos_session_no
            groups.setdefault(f"{subject}_{session}", []).append(path)
        for group, paths in sorted(groups.items()):
            paths.sort(key=lambda p: [int(v) for v in p.stem.split("_")])
            for i, path in enumerate(paths):
                track = f"nuaa/{attack}/{group}/{i // nuaa_track}"
                yield "nuaa", attack, group.split("_")[0], track, str(path), None
    for path in sorted((data / "videos").iterdir()):
        person, kind = path.stem.split("_")
        attack = "live" if kind == "live" else "replay"
        cap = cv2.VideoCapture(str(path))
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if index % video_step == 0:
                track = f"video/{path.stem}/{index // (video_step * video_track)}"
                yield "video", attack, person, track, f"{path}#{index}", frame
            index += 1
        cap.release()


def detect_all(args: argparse.Namespace) -> list[Sample]:
    """Every sample with its largest face (cached in benchmarks/results by detector and settings)."""
    cache = RESULTS / f"liveness-faces-v2-{args.detector}-{args.nuaa_track}-{args.video_track}-{args.video_step}.json"
    if cache.is_file():
        return [Sample(**row) for row in json.loads(cache.read_text())]
    detector: Detector = YuNetDetector(YUNET) if args.detector == "yunet" else MTCNNDetector(Manifest.load(args.models))
    samples, missed = [], 0
    for source, attack, person, track, key, image in iter_frames(args.data, args.nuaa_track, args.video_track,
                                                                   args.video_step):
        image = load_image(key) if image is None else image
        faces = detector.detect(image, 40)
        if not faces:
            missed += 1
            continue
        samples.append(Sample(source, attack, person, track, key, [float(v) for v in faces[0].box],
                              faces[0].landmarks.astype(float).tolist()))
    print(f"detection: {len(samples)} faces, {missed} images/frames without a face (left out)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([s.__dict__ for s in samples]))
    return samples


def open_model(directory: Path, calibration: BoxCalibration, threads: int) -> LivenessModel:
    """The gate on the MiniFASNet files of DIRECTORY, with the daemon's session options."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    sessions = [(name, ort.InferenceSession(str(directory / FILES[name]), sess_options=options,
                                            providers=["CPUExecutionProvider"]), scale)
                for name, scale in MODEL_SCALES.items()]
    return LivenessModel(sessions, calibration)


def iter_images(samples: list[Sample]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR image) of every sample, each video read once from start to end."""
    videos: dict[str, dict[int, int]] = {}
    for i, sample in enumerate(samples):
        if "#" in sample.key:
            path, frame = sample.key.rsplit("#", 1)
            videos.setdefault(path, {})[int(frame)] = i
        else:
            yield i, load_image(sample.key)
    for path, frames in videos.items():
        cap = cv2.VideoCapture(path)
        index = 0
        while frames:
            ok, image = cap.read()
            if not ok:
                break
            if index in frames:
                yield frames.pop(index), image
            index += 1
        cap.release()


class ScoreCache:
    """Live scores per (crop calibration, sample), kept in benchmarks/results so reruns only score what is new."""

    def __init__(self, model: LivenessModel, path: Path):
        self.model, self.path = model, path
        self.scores: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, samples: list[Sample], calibration: BoxCalibration) -> np.ndarray:
        """The live score of every sample with CALIBRATION."""
        tag = f"{calibration.scale:g},{calibration.shift_y:g}|"
        todo = [s for s in samples if tag + s.key not in self.scores]
        if todo:
            self.model.calibration = calibration
            for i, image in iter_images(todo):
                self.scores[tag + todo[i].key] = self.model.score(image, todo[i].box)
            self.path.write_text(json.dumps(self.scores))
        return np.array([self.scores[tag + s.key] for s in samples])


def error_rates(scores: np.ndarray, live: np.ndarray, threshold: float) -> tuple[float, float]:
    """(APCER, BPCER) at THRESHOLD: attacks scoring >= it are accepted, live ones below it rejected."""
    attacks, genuine = scores[~live], scores[live]
    apcer = float(np.mean(attacks >= threshold)) if attacks.size else float("nan")
    bpcer = float(np.mean(genuine < threshold)) if genuine.size else float("nan")
    return apcer, bpcer


def equal_error_rate(scores: np.ndarray, live: np.ndarray) -> float:
    """The error where APCER and BPCER cross (mean of the two at the closest threshold)."""
    best = min((abs(a - b), (a + b) / 2) for a, b in (error_rates(scores, live, t) for t in np.unique(scores)))
    return best[1]


def track_scores(samples: list[Sample], scores: np.ndarray, min_frames: int) -> tuple[list[Sample], np.ndarray]:
    """One (first sample, mean score) per track of at least MIN_FRAMES frames, through `TrackLiveness`."""
    tracks: dict[str, tuple[Sample, TrackLiveness]] = {}
    for sample, score in zip(samples, scores):
        tracks.setdefault(sample.track, (sample, TrackLiveness(0.5, min_frames)))[1].add(float(score))
    kept = [(s, t.state.score) for s, t in tracks.values() if t.state.frames >= min_frames]
    return [s for s, _ in kept], np.array([v for _, v in kept])


def log_loss(scores: np.ndarray, live: np.ndarray) -> float:
    """Mean cross-entropy of the live scores as probabilities: how confidently right the gate is."""
    p = np.clip(np.where(live, scores, 1 - scores), 1e-6, 1)
    return float(-np.mean(np.log(p)))


def choose_threshold(scores: np.ndarray, live: np.ndarray, budget: float) -> float:
    """The centre of the thresholds whose APCER and BPCER on SCORES are both within BUDGET (EER point if none)."""
    candidates = np.unique(np.concatenate([scores, [0.0, 1.0]]))
    within = [t for t in candidates if max(error_rates(scores, live, t)) <= budget]
    if not within:
        return float(min(candidates, key=lambda t: abs(np.subtract(*error_rates(scores, live, t)))))
    return (min(within) + max(within)) / 2


def planar_residual(landmarks: list[np.ndarray]) -> float:
    """Largest RMS misfit (in eye distances) of a homography from the track's first landmarks to each later frame's.

    A flat photo or screen moves as one plane, so its 5 landmarks follow a homography up to detector
    noise; a real head turning moves the nose off the eye-mouth plane.
    """
    first = landmarks[0].astype(np.float32)
    worst = 0.0
    for points in landmarks[1:]:
        h, _ = cv2.findHomography(first, points.astype(np.float32), 0)
        if h is None:
            continue
        mapped = cv2.perspectiveTransform(first[None], h)[0]
        eyes = float(np.linalg.norm(points[1] - points[0]))
        worst = max(worst, float(np.sqrt(np.mean(np.sum((mapped - points) ** 2, axis=1)))) / max(eyes, 1.0))
    return worst


def time_per_face(model: LivenessModel, samples: list[Sample], count: int = 100) -> tuple[float, float]:
    """Median and 95th percentile ms of `model.score` (both crops and both networks) per face."""
    times = []
    for i, image in iter_images(samples[:count]):
        started = time.perf_counter()
        model.score(image, samples[i].box)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95))


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float, path: Path) -> None:
    """DET curves (APCER against BPCER over all thresholds) with the chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    grid = np.linspace(0, 1, 501)
    for label, (scores, live) in curves.items():
        rates = np.array([error_rates(scores, live, t) for t in grid])
        line, = ax.plot(rates[:, 1] * 100, rates[:, 0] * 100, label=label)
        apcer, bpcer = error_rates(scores, live, threshold)
        ax.plot([bpcer * 100], [apcer * 100], "o", color=line.get_color())
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set(xlabel="BPCER % (live rejected)", ylabel="APCER % (attacks accepted)", xlim=(0, 100), ylim=(0, 100),
           title=f"facedoor liveness DET (held-out people; dots: threshold {threshold:.2f})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_calibration(sample: Sample) -> bool:
    """NUAA people with odd subject ids tune the crop and the threshold; everyone else is held out."""
    return sample.source == "nuaa" and int(sample.person) % 2 == 1


def rates_row(label: str, samples: list[Sample], scores: np.ndarray, thresholds: list[float],
              min_frames: int) -> str:
    """One table row: frame and track counts, then APCER/BPCER per frame and per track at each threshold."""
    live = np.array([s.live for s in samples])
    tracks, track_values = track_scores(samples, scores, min_frames)
    track_live = np.array([s.live for s in tracks])
    cells = [f"{label:<28} {int((~live).sum()):>4}/{int(live.sum()):<4} {int((~track_live).sum()):>3}/"
             f"{int(track_live.sum()):<3}"]
    for threshold in thresholds:
        fa, fb = error_rates(scores, live, threshold)
        ta, tb = error_rates(track_values, track_live, threshold)
        cells.append(f"{fa:6.1%} {fb:6.1%} | {ta:6.1%} {tb:6.1%}")
    return " || ".join(cells)


def main() -> int:
    """Detect, score, calibrate on the calibration people, print the held-out table, write the DET PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models", help="models directory with the MTCNN export")
    parser.add_argument("--detector", choices=("mtcnn", "yunet"), default="mtcnn",
                        help="face boxes from facedoor's MTCNN or YuNet (../shared/models/yunet)")
    parser.add_argument("--antispoof-dir", type=Path, default=SHARED / "models/antispoof")
    parser.add_argument("--data", type=Path, default=SHARED / "data/antispoof")
    parser.add_argument("--nuaa-track", type=int, default=5, help="consecutive NUAA photos per track")
    parser.add_argument("--video-track", type=int, default=10, help="processed video frames per track")
    parser.add_argument("--video-step", type=int, default=3, help="use every Nth video frame (30 fps -> 10)")
    parser.add_argument("--min-frames", type=int, default=3, help="a track needs this many faces to be judged")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threshold", type=float, help="report at this threshold (e.g. the configured one) "
                        "instead of the one chosen on the calibration people")
    args = parser.parse_args()
    for needed in (args.data / "nuaa", args.data / "videos", *(args.antispoof_dir / f for f in FILES.values())):
        if not needed.exists():
            parser.error(f"{needed} not found (the reference data and models of ../shared/README.md)")

    samples = detect_all(args)
    model = open_model(args.antispoof_dir, BoxCalibration(), args.threads)
    cache = ScoreCache(model, RESULTS / f"liveness-scores-{args.detector}.json")
    calib = [s for s in samples if is_calibration(s)]
    held = [s for s in samples if not is_calibration(s)]
    calib_live = np.array([s.live for s in calib])

    # 1. crop calibration (detector box -> the box MiniFASNet was trained on): the lowest per-frame log-loss on
    # calibration people (their per-frame EER is printed too), kept only if it beats the detector's box by MIN_GAIN
    grid = [BoxCalibration(scale, shift) for scale in SCALE_GRID for shift in SHIFT_GRID]
    losses = {c: log_loss(cache.get(calib, c), calib_live) for c in grid}
    candidate = min(grid, key=lambda c: losses[c])
    best = candidate if losses[candidate] <= (1 - MIN_GAIN) * losses[BoxCalibration()] else BoxCalibration()
    print(f"crop calibration of the {args.detector} box on {len(calib)} faces of NUAA calibration people "
          "(per-frame log-loss / EER):")
    for scale in SCALE_GRID:
        row = [c for c in grid if c.scale == scale]
        cells = [f"x{c.scale:<4g} dy{c.shift_y:+.2f}: {losses[c]:.3f} / "
                 f"{equal_error_rate(cache.get(calib, c), calib_live):4.1%}" for c in row]
        print("  " + "  ".join(cells))
    print(f"  chosen: scale {best.scale:g}, shift_y {best.shift_y:+g} (a change must cut the log-loss by "
          f">= {MIN_GAIN:.0%} to be kept)")
    for name, subset in (("NUAA held-out", [s for s in held if s.source == "nuaa"]),
                         ("video replay", [s for s in held if s.source == "video"])):
        live = np.array([s.live for s in subset])
        raw, tuned = cache.get(subset, BoxCalibration()), cache.get(subset, candidate)
        print(f"  {name}: raw {args.detector} box log-loss {log_loss(raw, live):.3f} "
              f"EER {equal_error_rate(raw, live):.1%}; "
              f"best grid point (x{candidate.scale:g} dy{candidate.shift_y:+g}) {log_loss(tuned, live):.3f} "
              f"EER {equal_error_rate(tuned, live):.1%}")

    # 2. threshold: the centre of the range where per-track APCER and BPCER are both <= budget on calibration people
    calib_scores = cache.get(calib, best)
    tracks, values = track_scores(calib, calib_scores, args.min_frames)
    threshold = round(choose_threshold(values, np.array([s.live for s in tracks]), BPCER_BUDGET), 2)
    print(f"threshold {threshold:.2f}: centre of the thresholds with per-track APCER and BPCER <= {BPCER_BUDGET:.0%} "
          f"on {len(tracks)} calibration tracks (min {args.min_frames} frames)")
    if args.threshold is not None:
        threshold = args.threshold
        print(f"reporting at --threshold {threshold:.2f} instead")

    # 3. report on held-out people
    thresholds = sorted({0.1, threshold, 0.5})
    scores = cache.get(held, best)
    print(f"\nAPCER / BPCER on people never used for tuning (tracks: NUAA {args.nuaa_track} consecutive photos, "
          f"video {args.video_track} frames at 1/{args.video_step})")
    head = f"{'source / attack':<28} {'frames':>9} {'tracks':>7} || " + " || ".join(
        f"t={t:.2f} frame APCER BPCER | track APCER BPCER" for t in thresholds)
    print(head)
    rows = {"NUAA print (held-out)": [s for s in held if s.source == "nuaa"],
            "video replay (2 people)": [s for s in held if s.source == "video"]}
    for person in sorted({s.person for s in held if s.source == "video"}):
        rows[f"  video replay: {person}"] = [s for s in held if s.source == "video" and s.person == person]
    index = {s.key: i for i, s in enumerate(held)}
    for label, subset in rows.items():
        print(rates_row(label, subset, scores[[index[s.key] for s in subset]], thresholds, args.min_frames))
    print(rates_row("NUAA print (calibration)", calib, calib_scores, thresholds, args.min_frames))

    # 4. the planar-motion cue: measured, used only if it separates live from attack tracks
    print("\nplanar-motion cue (homography misfit of the 5 landmarks across a track; AUC 0.5 = no information):")
    for label, subset in list(rows.items())[:2] + [("NUAA print (calibration)", calib)]:
        groups: dict[str, list[Sample]] = {}
        for sample in subset:
            groups.setdefault(sample.track, []).append(sample)
        residual: dict[bool, list[float]] = {True: [], False: []}
        for members in groups.values():
            if len(members) >= args.min_frames:
                residual[members[0].live].append(planar_residual([np.array(m.landmarks) for m in members]))
        live, attack = np.array(residual[True])[:, None], np.array(residual[False])[None, :]
        auc = float(np.mean(live > attack) + 0.5 * np.mean(live == attack))
        print(f"  {label:<28} live median {np.median(live):.3f}, attack median {np.median(attack):.3f}, "
              f"AUC {auc:.2f}")

    # 5. DET curves and the gate's cost
    curves = {}
    for label, subset in list(rows.items())[:2]:
        sub_scores = scores[[index[s.key] for s in subset]]
        curves[f"{label}, per frame"] = (sub_scores, np.array([s.live for s in subset]))
        tracks, values = track_scores(subset, sub_scores, args.min_frames)
        curves[f"{label}, per track"] = (values, np.array([s.live for s in tracks]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"liveness-det-{args.detector}.png"
    plot_det(curves, threshold, png)
    print(f"\nDET curve: {png}")
    model.calibration = best
    median, p95 = time_per_face(model, held)
    print(f"gate time per face (2 crops + MiniFASNetV2 + V1SE, {args.threads} thread): median {median:.1f} ms, "
          f"p95 {p95:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
