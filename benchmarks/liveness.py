"""Liveness gate, leave one source out: per-visit APCER / BPCER, the member's cost and the gate's time per face.

Sources (../shared/data/antispoof, plus attacks made here):
- nuaa: 16 people, live webcam photos and hand-held printed photos. NUAA keeps single frames (every
  15th/20th of a capture), so a NUAA "visit" is --nuaa-visit consecutive photos of one subject and
  session: a door that sees the person at ~1-2 frames a second. Blinks and short-lag motion mean
  little there; say so when reading its row.
- one source per replay-video person (apfol, tranvanluyt): a live webcam video and a replay of it on a
  phone or monitor. A visit is --visit-s seconds of video (every --video-step-th frame, as a door
  at 15 fps sees it), one starting every second (visits overlap).
- still: still-photo injection. Each NUAA live photo (first of a subject/session) and one live-video
  frame a second, repeated as the stream for a whole visit (a frozen or injected camera), and
  --noisy-stills of them again with fresh sensor noise on each frame (a print held perfectly still).

For each held-out source the fusion rule (`facedoor.liveness.FusionRule`: a logistic rule over
`track_features`, threshold chosen on the training visits) is fitted on the other sources only and
the held-out visits are judged frame by frame by the door's own accumulator (`TrackLiveness`):
a visit is accepted when its verdict turns "live" at any frame. APCER = attack visits accepted,
BPCER = live visits never accepted. The hard planar rule is fixed, not fitted (FusionRule.planar_floor).
Cost for members: seconds from a live visit's first frame to its "live" verdict (median, p95), and
how many live visits contain no blink (eye-aspect-ratio dip of a third). Time per face: the gate's
models on one core (a frame's share: one MiniFASNet, the face mesh, one iris), detection excluded.

The active challenge (`liveness.challenge`, `facedoor.challenge`): every video visit (and every
still), now challenge_timeout_s + 1 s long, is asked each direction at its first frame with a mesh,
and the door's own `TrackChallenge` says whether the head poses answer it (passed, wrong,
timeout) and when. Nobody in these videos was asked anything: a live row says how often a
person's natural movement alone would answer (a member who follows the instruction answers more
often, which these videos cannot show), a replay row how often a replay's recorded movement does
(its luck), a still row that nothing answers. The time it adds to a live unlock is the answer's
time beyond the gate's own verdict (`always`), and `on_doubt` asks only the live visits the gate has
not called live within challenge_after_s.

    .venv/bin/python benchmarks/liveness.py --models DIR [--fit-all] [--challenge-only]

DIR holds the mtcnn, antispoof and landmarks exports (`facedoor-export --only mtcnn,antispoof,landmarks
--antispoof-dir ../shared/models/antispoof`). Per-frame cues are cached in benchmarks/results/
(git-ignored). --fit-all prints the rule fitted on every source (the shipped DEFAULT_RULE).
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import minimize

from facedoor.challenge import Answer, Ask, Direction, TrackChallenge
from facedoor.config import LivenessConfig
from facedoor.detect import MTCNNDetector
from facedoor.landmarks import head_pose
from facedoor.liveness import (
    DEFAULT_RULE,
    FEATURES,
    Cues,
    FrameEvidence,
    FusionRule,
    LivenessModel,
    TrackLiveness,
    judge,
    track_features,
)
from facedoor.models import Manifest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks/results"
FPS = 30.0
BLINK_DIP = 1 / 3
BPCER_PART = 0.02  # live training visits each part may turn away when its threshold is chosen
CACHE_VERSION = 4


@dataclass
class Visit:
    """What the door sees of one visit: the per-frame cues (None: no face that frame) and the labels."""

    source: str
    person: str
    attack: str  # "live", "print", "replay", "still", "still+noise"
    cues: list[Cues]
    fps: float

    @property
    def live(self) -> bool:
        return self.attack == "live"


def track_cues(model: LivenessModel, detector: MTCNNDetector, images: list[np.ndarray]) -> list[Cues | None]:
    """The cues of the largest face of each image (None: no face), observed as one track: the door's turns
    (`LivenessModel.observe`) count the frames with a face."""
    out: list[Cues | None] = []
    turn = 0
    for image in images:
        faces = detector.detect(image, 40)
        out.append(model.observe(image, faces[0], turn) if faces else None)
        turn += bool(faces)
    return out


def video_frames(path: Path, step: int) -> Iterator[np.ndarray]:
    """Every STEP-th frame of the video at PATH."""
    cap = cv2.VideoCapture(str(path))
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % step == 0:
            yield frame
        index += 1
    cap.release()


def collect(args: argparse.Namespace) -> dict[str, list[tuple[str, str, list[Cues | None]]]]:
    """Per source, (person, attack, per-frame cues) sequences: NUAA subject/sessions and whole videos (cached)."""
    cache = RESULTS / f"liveness-cues-v{CACHE_VERSION}-step{args.video_step}-noisy{args.noisy_stills}.pkl"
    if cache.is_file():
        with cache.open("rb") as f:
            loaded: dict[str, list[tuple[str, str, list[Cues | None]]]] = pickle.load(f)
        return loaded
    manifest = Manifest.load(args.models)
    model = LivenessModel.from_manifest(manifest, 1)
    detector = MTCNNDetector(manifest, 1)
    data = args.data
    sequences: dict[str, list[tuple[str, str, list[Cues | None]]]] = {}
    stills: list[tuple[str, np.ndarray]] = []
    for folder in ("live", "print"):
        groups: dict[str, list[Path]] = {}
        for path in (data / "nuaa" / folder).glob("*.jpg"):
            subject, _, _, _, session, _ = path.stem.split("_")
            groups.setdefault(f"{subject}_{session}", []).append(path)
        for group, paths in sorted(groups.items()):
            paths.sort(key=lambda p: [int(v) for v in p.stem.split("_")])
            images = [cv2.imread(str(p)) for p in paths]
            sequences.setdefault("nuaa", []).append(
                (group.split("_")[0], folder, track_cues(model, detector, images)))
            if folder == "live":
                stills.append((group.split("_")[0], images[0]))
        print(f"nuaa {folder}: {len(groups)} subject/sessions", file=sys.stderr)
    for path in sorted((data / "videos").iterdir()):
        person, kind = path.stem.split("_")
        frames = list(video_frames(path, args.video_step))
        cues = track_cues(model, detector, frames)
        sequences.setdefault(person, []).append((person, "live" if kind == "live" else "replay", cues))
        if kind == "live":
            stills.extend((person, frame) for frame in frames[::int(FPS / args.video_step)])
        print(f"{path.name}: {len(frames)} frames, {sum(c is None for c in cues)} without a face", file=sys.stderr)
    rng = np.random.default_rng(0)
    still_seqs: list[tuple[str, str, list[Cues | None]]] = []
    for person, image in stills:
        still_seqs.append((person, "still", track_cues(model, detector, [image, image])))  # both turns
    for i in rng.choice(len(stills), size=min(args.noisy_stills, len(stills)), replace=False):
        person, image = stills[int(i)]
        frames = int(args.visit_s * FPS / args.video_step)
        noisy = [np.clip(image + rng.normal(0, 3.0, image.shape), 0, 255).astype(np.uint8) for _ in range(frames)]
        still_seqs.append((person, "still+noise", track_cues(model, detector, noisy)))
    sequences["still"] = still_seqs
    RESULTS.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as f:
        pickle.dump(sequences, f)
    return sequences


def visits(sequences: dict[str, list[tuple[str, str, list[Cues | None]]]], args: argparse.Namespace) -> list[Visit]:
    """The visits of every source (see the module doc)."""
    fps = FPS / args.video_step
    length = int(round(args.visit_s * fps))
    out: list[Visit] = []
    for source, seqs in sequences.items():
        for person, attack, cues in seqs:
            present = [c for c in cues if c is not None]
            if source == "nuaa":
                out.extend(Visit(source, person, attack, present[i:i + args.nuaa_visit], 1.5)
                           for i in range(0, len(present) - args.nuaa_visit + 1, args.nuaa_visit))
            elif source == "still":
                if not present:
                    continue
                out.append(Visit(source, person, attack, (present * length)[:length], fps))
            else:
                out.extend(Visit(source, person, attack, [c for c in cues[i:i + length] if c is not None], fps)
                           for i in range(0, len(cues) - length + 1, int(fps)))
    return out


def evidence(visit: Visit) -> list[FrameEvidence]:
    """The per-frame evidence the door's accumulator derives from the visit's cues."""
    acc = TrackLiveness(window=10**6)
    for cues in visit.cues:
        acc.add(cues)
    return acc.frames


def prefix_features(frames: list[FrameEvidence], rule: FusionRule) -> np.ndarray:
    """(prefixes, features) of the track as the door judges it after each of its frames from min_frames on."""
    return np.array([track_features(frames[:n]) for n in range(rule.min_frames, len(frames) + 1)])


def fit(xs: np.ndarray, ys: np.ndarray, c: float = 1.0) -> tuple[tuple[float, ...], float]:
    """L2-regularised logistic regression (classes weighted equally): weights and bias in raw feature units."""
    mean, std = xs.mean(axis=0), xs.std(axis=0) + 1e-9
    z = (xs - mean) / std
    w_class = np.where(ys == 1, 0.5 / max(ys.sum(), 1), 0.5 / max((1 - ys).sum(), 1))

    def loss(theta: np.ndarray) -> float:
        logits = z @ theta[:-1] + theta[-1]
        nll = np.logaddexp(0, -logits) * ys + np.logaddexp(0, logits) * (1 - ys)
        return float((w_class * nll).sum() + np.sum(theta[:-1] ** 2) / (2 * c * len(ys)))

    theta = minimize(loss, np.zeros(xs.shape[1] + 1), method="L-BFGS-B").x
    weights = theta[:-1] / std
    bias = float(theta[-1] - np.dot(weights, mean))
    return tuple(float(w) for w in weights), bias


def run_visit(frames: list[FrameEvidence], rule: FusionRule) -> int | None:
    """Index of the frame at which the door's verdict (`judge`) first turns live, None if never."""
    for n in range(rule.min_frames, len(frames) + 1):
        if judge(frames[:n], rule)[0] == "live":
            return n - 1
    return None


def peaks(series: list[np.ndarray]) -> np.ndarray:
    """Each visit's highest value of a per-frame series (the door acts on the first frame that passes)."""
    return np.sort([float(v.max()) for v in series if len(v)])


def threshold_between(live: np.ndarray, attack: np.ndarray, budget: float) -> float:
    """Midway (in log-odds) between the peak probability that all but BUDGET of the live visits reach and the
    one that all but BUDGET of the attack visits stay under; the live one when the two overlap."""
    live_q = float(live[int(np.floor(budget * len(live)))]) if len(live) else 0.5
    attack_q = float(attack[min(int(np.ceil((1 - budget) * len(attack))), len(attack) - 1)]) if len(attack) else 0.0
    if attack_q >= live_q:
        return live_q
    lo, hi = (min(max(p, 1e-4), 1 - 1e-4) for p in (attack_q, live_q))
    mid = (np.log(lo / (1 - lo)) + np.log(hi / (1 - hi))) / 2
    return float(1 / (1 + np.exp(-mid)))


def fit_rule(train: list[tuple[Visit, list[FrameEvidence], np.ndarray]], base: FusionRule) -> FusionRule:
    """The rule fitted on TRAIN visits only: the motion part's logistic weights on live against print and
    still visits (a replay of a live video moves like a head: motion cannot learn it), then each part's
    threshold midway between the live and the attack visits' peaks (`threshold_between`): texture
    against prints and replays, motion against prints and stills. A peak is taken over the track's
    prefixes that the hard rules leave to the parts (`FusionRule.hard_no`): an attack they stop
    anyway (a still stands still, a flat print fits one plane) says nothing about where a part must
    draw its line, and counting it let the fit's scale on a separable still-versus-live problem
    push the motion threshold to 0.98."""
    xs, ys = [], []
    for visit, _, feats in train:
        if visit.attack != "replay" and len(feats):
            xs.append(feats[:, 1:])
            ys.append(np.full(len(feats), 1.0 if visit.live else 0.0))
    weights, bias = fit(np.concatenate(xs), np.concatenate(ys))
    rule = replace(base, weights=weights, bias=bias)

    def open_prefixes(feats: np.ndarray) -> np.ndarray:
        return np.array([not rule.hard_no(x) for x in feats], dtype=bool)

    def passive(frames: list[FrameEvidence], feats: np.ndarray) -> np.ndarray:
        means = np.array([np.mean([f.passive for f in frames[:n]]) for n in range(rule.min_frames, len(frames) + 1)])
        return means[open_prefixes(feats)]

    def motion(feats: np.ndarray) -> np.ndarray:
        return np.array([rule.motion_probability(x) for x in feats])[open_prefixes(feats)]

    live = [(frames, feats) for visit, frames, feats in train if visit.live]
    attacks = [(visit, frames, feats) for visit, frames, feats in train if not visit.live]
    passive_t = threshold_between(peaks([passive(f, x) for f, x in live]),  # an injected still is a live face's texture
                                  peaks([passive(f, x) for v, f, x in attacks if not v.attack.startswith("still")]),
                                  BPCER_PART)
    motion_t = threshold_between(peaks([motion(x) for _, x in live]),
                                 peaks([motion(x) for v, _, x in attacks if v.attack != "replay"]), BPCER_PART)
    return replace(rule, passive_threshold=passive_t, motion_threshold=motion_t)


def challenge_answer(frames: list[FrameEvidence], fps: float, direction: Direction, cfg: LivenessConfig
                     ) -> tuple[Answer, float | None]:
    """The door's challenge (`TrackChallenge`) asked for DIRECTION at the visit's first frame with a pose:
    its answer and the seconds from that frame to it (None: no answer)."""
    start = next((i for i, f in enumerate(frames) if f.pose is not None), None)
    if start is None:
        return "timeout", None
    reference = frames[start].pose
    assert reference is not None
    challenge = TrackChallenge(Ask("benchmark", 0, direction, start / fps, cfg.challenge_timeout_s, reference))
    for i in range(start + 1, len(frames)):
        state = challenge.see(i / fps, frames[i].pose, cfg.challenge_directions, cfg.challenge_degrees)
        if state != "pending":
            return state, (i - start) / fps if state != "timeout" else None
    return "timeout", None


def print_challenge(sequences: dict[str, list[tuple[str, str, list[Cues | None]]]], args: argparse.Namespace) -> None:
    """The challenge table (see the module doc)."""
    cfg = LivenessConfig(challenge="always", challenge_degrees=args.challenge_degrees,
                         challenge_timeout_s=args.challenge_timeout)
    long = argparse.Namespace(**{**vars(args), "visit_s": cfg.challenge_timeout_s + 1.0})
    rows = [(v, evidence(v)) for v in visits(sequences, long) if v.source not in ("nuaa",)]
    print(f"\nchallenge, asked at each visit's first frame ({cfg.challenge_degrees:g} degrees held 2 frames, "
          f"timeout {cfg.challenge_timeout_s:g} s, directions {'/'.join(cfg.challenge_directions)}; "
          "nobody was actually asked)")
    print(f"{'visits':20s} {'asked':>6s} {'passed':>14s} {'wrong':>14s} {'timeout':>14s} {'answer s med/p95':>17s}")
    for kind in ("live", "replay", "still", "still+noise"):
        answers = [challenge_answer(f, v.fps, d, cfg) for v, f in rows if v.attack == kind
                   for d in cfg.challenge_directions]
        if not answers:
            continue
        n = len(answers)
        times = [t for a, t in answers if a == "passed" and t is not None]
        when = f"{np.median(times):.2f}/{np.percentile(times, 95):.2f}" if times else "-"
        print(f"{kind:20s} {n:6d} {pct(sum(a == 'passed' for a, _ in answers), n):>14s} "
              f"{pct(sum(a == 'wrong' for a, _ in answers), n):>14s} "
              f"{pct(sum(a == 'timeout' for a, _ in answers), n):>14s} {when:>17s}")
    jitter = [abs(f.pose.yaw - first.pose.yaw) for v, frames in rows if v.attack.startswith("still")
              for first in frames[:1] if first.pose is not None for f in frames if f.pose is not None]
    print(f"the head pose's jitter on stills (landmark noise): p99 |yaw change| {np.percentile(jitter, 99):.2f}, "
          f"max {max(jitter):.2f} degrees")
    live = [(v, f) for v, f in rows if v.live]
    added, doubtful = [], 0
    for v, f in live:
        verdict = run_visit(f, DEFAULT_RULE)
        live_t = (verdict + 1) / v.fps if verdict is not None else None
        doubtful += live_t is None or live_t > cfg.challenge_after_s
        for d in cfg.challenge_directions:
            answered, t = challenge_answer(f, v.fps, d, cfg)
            if answered == "passed" and t is not None and live_t is not None:
                added.append(max(0.0, t - live_t))
    if added:
        print(f"time added to a live unlock that answered (always): median {np.median(added):.2f} s, "
              f"p95 {np.percentile(added, 95):.2f} s, over {len(added)} answers")
    print(f"on_doubt: {pct(doubtful, len(live))} live visits not called live within {cfg.challenge_after_s:g} s "
          "would be asked")


def blinked(frames: list[FrameEvidence]) -> bool:
    """The visit holds an eye-aspect-ratio dip of BLINK_DIP below its median."""
    ears = np.array([f.ear for f in frames if f.ear is not None])
    return bool(len(ears) >= 3 and ears.min() <= (1 - BLINK_DIP) * np.median(ears))


def pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.0f} %)" if d else "-"


def time_per_face(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Median CPU ms per face of each part of the gate (ONNX Runtime on one thread), over live-video frames
    taken as one track (its turns alternate the MiniFASNet and the eye, as at the door).

    CPU time, not wall time, so that other processes on a busy machine do not inflate it."""
    manifest = Manifest.load(args.models)
    model = LivenessModel.from_manifest(manifest, 1)
    detector = MTCNNDetector(manifest, 1)
    frames = list(video_frames(args.data / "videos/apfol_live.webm", 5))[:30]
    faces = [(f, detector.detect(f, 40)) for f in frames]
    faces = [(f, d[0]) for f, d in faces if d]
    mesh_model = model.mesh
    assert mesh_model is not None
    parts: dict[str, list[float]] = {"one MiniFASNet (V2 / V1SE)": [], "face mesh + 1 iris": [],
                                     "face mesh only": [], "whole gate (observe + add)": [],
                                     "head pose (challenge)": []}
    acc = TrackLiveness()
    for image, face in faces * 2:
        turn = acc.turn
        t0 = time.process_time()
        model.live_probability(image, face.box, turn % len(model.sessions))
        t1 = time.process_time()
        mesh = mesh_model.mesh(image, face.box, face.landmarks[:2], (turn % 2,))
        t2 = time.process_time()
        mesh_model.mesh(image, face.box, face.landmarks[:2], ())
        t3 = time.process_time()
        acc.add(model.observe(image, face, turn))
        t4 = time.process_time()
        for _ in range(100):
            head_pose(mesh.points)
        t5 = time.process_time()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, (t5 - t4) / 100)):
            parts[key].append(dt * 1000)
    rows = [(k, float(np.median(v))) for k, v in parts.items()]
    return [*rows, ("whole gate, p95 of frames", float(np.percentile(parts["whole gate (observe + add)"], 95)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--data", type=Path, default=SHARED / "data/antispoof")
    parser.add_argument("--video-step", type=int, default=2)
    parser.add_argument("--visit-s", type=float, default=3.0)
    parser.add_argument("--nuaa-visit", type=int, default=10)
    parser.add_argument("--noisy-stills", type=int, default=12)
    parser.add_argument("--fit-all", action="store_true", help="print the rule fitted on every source")
    parser.add_argument("--no-timing", action="store_true", help="skip the time per face")
    parser.add_argument("--timing-only", action="store_true", help="only the time per face (on a quiet machine)")
    parser.add_argument("--challenge-only", action="store_true", help="only the challenge table")
    parser.add_argument("--challenge-degrees", type=float, default=LivenessConfig().challenge_degrees)
    parser.add_argument("--challenge-timeout", type=float, default=LivenessConfig().challenge_timeout_s)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}", file=sys.stderr)
        return 2
    if args.timing_only:
        print_timing(args)
        return 0
    sequences = collect(args)
    if args.challenge_only:
        print_challenge(sequences, args)
        return 0
    base = DEFAULT_RULE
    all_visits = [(v, f, prefix_features(f, base)) for v in visits(sequences, args) for f in [evidence(v)]]
    sources = sorted({v.source for v, _, _ in all_visits})
    counts = ", ".join(f"{s} {sum(v.source == s for v, _, _ in all_visits)}" for s in sources)
    print(f"visits: {len(all_visits)} ({counts})")
    print("\nfeature medians per kind (" + ", ".join(FEATURES) + ")")
    for attack in ("live", "print", "replay", "still", "still+noise"):
        feats = [track_features(f) for v, f, _ in all_visits if v.attack == attack]
        if feats:
            print(f"  {attack:12s} " + "  ".join(f"{m:8.4f}" for m in np.median(feats, axis=0)))
    print("\nleave one source out (rule fitted on the other sources; per visit)")
    print(f"{'held out':12s} {'APCER':>16s} {'BPCER':>16s} {'unlock s med/p95':>17s} {'no blink':>14s}  "
          "thresholds texture / motion")
    for held in sources:
        train = [t for t in all_visits if t[0].source != held]
        test = [(v, f) for v, f, _ in all_visits if v.source == held]
        rule = fit_rule(train, base)
        attacks = [(v, f) for v, f in test if not v.live]
        lives = [(v, f) for v, f in test if v.live]
        accepted = sum(run_visit(f, rule) is not None for _, f in attacks)
        unlock = [run_visit(f, rule) for _, f in lives]
        times = [(i + 1) / v.fps for (v, _), i in zip(lives, unlock) if i is not None]
        t = f"{np.median(times):.2f}/{np.percentile(times, 95):.2f}" if times else "-"
        no_blink = sum(not blinked(f) for _, f in lives)
        kinds = ",".join(sorted({v.attack for v, _ in attacks}))
        print(f"{held:12s} {pct(accepted, len(attacks)):>16s} {pct(sum(i is None for i in unlock), len(lives)):>16s} "
              f"{t:>17s} {pct(no_blink, len(lives)):>14s}  {rule.passive_threshold:.2f} / "
              f"{rule.motion_threshold:.2f}  ({kinds})")
    stills = [f for v, f, _ in all_visits if v.source == "still"]
    print(f"\nstill photos injected as the stream: {sum(run_visit(f, DEFAULT_RULE) is not None for f in stills)} "
          f"of {len(stills)} unlock with the shipped rule")
    if args.fit_all:
        rule = fit_rule(all_visits, DEFAULT_RULE)
        print(f"\nfitted on every source: weights={tuple(round(w, 4) for w in rule.weights)} "
              f"bias={rule.bias:.4f} passive_threshold={rule.passive_threshold:.3f} "
              f"motion_threshold={rule.motion_threshold:.3f}")
    print_challenge(sequences, args)
    if not args.no_timing:
        print_timing(args)
    return 0


def print_timing(args: argparse.Namespace) -> None:
    """The time-per-face table, with the machine's load (other processes inflate it)."""
    import os

    print(f"\ngate CPU time per face, one thread (median ms; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs)")
    for name, ms in time_per_face(args):
        print(f"  {name:28s} {ms:7.2f}")


if __name__ == "__main__":
    sys.exit(main())
