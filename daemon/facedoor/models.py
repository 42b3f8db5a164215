"""The model manifest written by `facedoor-export`, and ONNX Runtime sessions opened from it.

The manifest is the one written contract between build time and run time: it names each
ONNX file with its SHA-256, its input layout and the preprocessing it expects. Nothing is
loaded whose hash does not match, so a swapped or truncated model keeps the door locked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
WHOLE_NAME_GROUPS = {"facenet_int8"}  # export groups whose name has an underscore


class ModelError(RuntimeError):
    """A model or the manifest is missing, unreadable or does not match its recorded hash."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large models never sit twice in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input tensor (recorded by the exporter, followed here).

    `color` is the channel order the model wants ("RGB" or "BGR"). `normalize` is either
    "per_image_standardization" ((x - mean) / max(std, 1/sqrt(x.size)) per image) or "affine"
    ((x - mean) * scale per channel).
    """

    color: str = "RGB"
    normalize: str = "affine"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Preprocessing":
        return cls(
            color=str(raw.get("color", "RGB")),
            normalize=str(raw.get("normalize", "affine")),
            mean=tuple(float(v) for v in raw.get("mean", (0.0, 0.0, 0.0))),
            scale=float(raw.get("scale", 1.0)),
        )


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest: file, hash, input contract and metadata."""

    name: str
    kind: str
    file: str
    sha256: str
    input_name: str
    input_shape: tuple[int | None, ...]
    layout: str
    preprocessing: Preprocessing
    embedding_dim: int | None = None
    threshold: float | None = None
    untrained: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of a fixed-size image input, None where it is dynamic."""
        shape = self.input_shape
        h, w = (shape[1], shape[2]) if self.layout == "NHWC" else (shape[2], shape[3])
        return (h, w) if h and w else None


class Manifest:
    """A parsed `manifest.json` and the directory its files live in."""

    def __init__(self, directory: Path, entries: dict[str, ModelEntry], raw: dict[str, Any]):
        self.directory = directory
        self.entries = entries
        self.raw = raw

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """Read DIR/manifest.json; a missing or malformed manifest is a ModelError naming it."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ModelError(
                f"no model manifest at {path}: build the models with "
                f"`facedoor-export --out {directory}`"
            )
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {MANIFEST_FORMAT}")
            entries = {name: _parse_entry(name, body) for name, body in raw["models"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: unreadable model manifest ({exc})") from exc
        return cls(directory, entries, raw)

    def entry(self, name: str) -> ModelEntry:
        """The manifest entry for NAME, or a ModelError that says how to build it."""
        try:
            return self.entries[name]
        except KeyError:
            raise ModelError(
                f"model {name!r} is not in {self.directory / MANIFEST_NAME} "
                f"(has: {', '.join(sorted(self.entries)) or 'none'}); build it with "
                f"`facedoor-export --out {self.directory} --only {export_group(name)}`"
            ) from None

    def path(self, name: str) -> Path:
        return self.directory / self.entry(name).file

    def verify(self, name: str) -> Path:
        """Check NAME's file exists and its SHA-256 matches the manifest; return its path."""
        entry = self.entry(name)
        path = self.directory / entry.file
        if not path.is_file():
            raise ModelError(f"model {name!r}: file {path} is missing")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ModelError(
                f"model {name!r}: {path} has SHA-256 {actual}, manifest expects {entry.sha256}; "
                "refusing to load it (re-run facedoor-export)"
            )
        return path

    def session(self, name: str, threads: int | None = None, *, layout_optimization: bool = False) -> "Any":
        """An ONNX Runtime session for NAME after its hash check (CPU, optional thread cap).

        LAYOUT_OPTIMIZATION applies ORT's NCHWc layout transforms (ORT_ENABLE_ALL) in a child
        process and loads the result with no further optimisation: the fast convolutions
        without the second, reordered copy of the weights that in-process ALL keeps resident
        (FaceNet: 20 ms and 171 MB this way; 20 ms and 313 MB in-process ALL; 26 ms and 215 MB
        EXTENDED). If the child fails, the session falls back to EXTENDED with a warning."""
        import onnxruntime as ort

        path = self.verify(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # No busy-waiting workers: on a 2-core door unit they starve the capture thread
        # (analyze() median 311 ms spinning vs 55 ms not, with capture running alongside).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            if layout_optimization:
                with tempfile.TemporaryDirectory(prefix="facedoor-ort-") as private:  # mode 0700
                    optimized = _optimize_in_child(name, path, Path(private) / "optimized.onnx")
                    if optimized is not None:
                        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                        return ort.InferenceSession(
                            str(optimized), sess_options=options, providers=["CPUExecutionProvider"]
                        )
            return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"model {name!r}: ONNX Runtime cannot load {path}: {exc}") from exc


_OPTIMIZE = """
import sys, onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], sess_options=options, providers=["CPUExecutionProvider"])
"""


def _optimize_in_child(name: str, source: Path, target: Path) -> Path | None:
    """Write SOURCE optimised for this CPU to TARGET from a child process; None if that failed.

    The child pays the optimiser's transient memory, so the daemon's peak RSS never sees it."""
    proc = subprocess.run([sys.executable, "-c", _OPTIMIZE, str(source), str(target)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 and target.is_file():
        return target
    log.warning("model %r: layout optimisation failed (exit %d), using the plain graph: %s",
                name, proc.returncode, proc.stderr.strip()[-500:])
    return None


def export_group(entry_name: str) -> str:
    """The `facedoor-export --only` group that builds a manifest entry (mtcnn_pnet -> mtcnn)."""
    return entry_name if entry_name in WHOLE_NAME_GROUPS else entry_name.split("_", 1)[0]


def _parse_entry(name: str, body: dict[str, Any]) -> ModelEntry:
    inp = body["input"]
    return ModelEntry(
        name=name,
        kind=str(body["kind"]),
        file=str(body["file"]),
        sha256=str(body["sha256"]),
        input_name=str(inp["name"]),
        input_shape=tuple(None if d is None else int(d) for d in inp["shape"]),
        layout=str(inp.get("layout", "NHWC")),
        preprocessing=Preprocessing.from_dict(body.get("preprocessing", {})),
        embedding_dim=body.get("embedding_dim"),
        threshold=body.get("threshold"),
        untrained=bool(body.get("weights", {}).get("untrained", False)),
        raw=body,
    )
