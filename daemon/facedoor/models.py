"""The model manifest written by `facedoor-export`, and ONNX Runtime sessions opened from it.

The manifest is the one written contract between build time and run time: it names each
ONNX file with its SHA-256, its input layout and the preprocessing it expects. Nothing is
loaded whose hash does not match, so a swapped or truncated model keeps the door locked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SYSTEM_MODELS_DIR = Path("/var/lib/facedoor/models")


def default_models_dir() -> Path:
    """Where models are looked for when none is given, the same for `facedoor` and
    `facedoor-stylize`: $FACEDOOR_MODELS, else ./models when it holds a manifest, else the door's
    /var/lib/facedoor/models."""
    if os.environ.get("FACEDOOR_MODELS"):
        return Path(os.environ["FACEDOOR_MODELS"])
    local = Path("models")
    return local if (local / MANIFEST_NAME).is_file() else SYSTEM_MODELS_DIR
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


class _Contract(BaseModel):
    """A part of the manifest: fields the contract names are required; anything else is kept as
    metadata (params, architecture, outputs, parity...)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Preprocessing(_Contract):
    """How pixels become the model's input tensor (recorded by the exporter, followed here).

    `color` is the channel order the model wants. `normalize` is "per_image_standardization"
    ((x - mean) / max(std, 1/sqrt(x.size)) per image) or "affine" ((x - mean) * scale per channel).
    """

    color: Literal["RGB", "BGR"]
    normalize: Literal["per_image_standardization", "affine"]
    mean: tuple[float, float, float]
    scale: float


class ModelInput(_Contract):
    """The model's one image input."""

    name: str
    shape: tuple[int | None, ...]
    layout: Literal["NHWC", "NCHW"]


class ModelEntry(_Contract):
    """One model of the manifest: file, hash, input contract and metadata.

    Written by `facedoor-export` (which validates every entry with this class before writing it)
    and read here; a manifest missing a contract field is refused with the field's name."""

    name: str = Field("", exclude=True)  # the manifest key, filled in by Manifest.load
    kind: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: ModelInput
    preprocessing: Preprocessing
    embedding_dim: int | None = Field(None, gt=0, description="encoders: the embedding's length")
    threshold: float | None = Field(
        None, gt=0, lt=2, description="encoders: the recommended operating point (L2 distance), its one home"
    )
    weights: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _encoder_contract(self) -> ModelEntry:
        if self.kind == "encoder" and (self.embedding_dim is None or self.threshold is None):
            raise ValueError("an encoder entry needs embedding_dim and threshold")
        return self

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        return self.input.shape

    @property
    def layout(self) -> str:
        return self.input.layout

    @property
    def untrained(self) -> bool:
        """True for generated (test) weights: never for a real door."""
        return bool(self.weights.get("untrained", False))

    def extra(self, key: str, default: Any = None) -> Any:
        """A metadata field beyond the contract (e.g. a style-transfer graph's layer names)."""
        return (self.model_extra or {}).get(key, default)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of a fixed-size image input, None where it is dynamic."""
        shape = self.input_shape
        h, w = (shape[1], shape[2]) if self.layout == "NHWC" else (shape[2], shape[3])
        return (h, w) if h and w else None


def describe_invalid(exc: ValidationError) -> str:
    """Pydantic's report as `field.path: problem` items, for one-line errors."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}"
                     for e in exc.errors(include_url=False))


IN_PROCESS_ALL_BYTES = 32 * 1024 * 1024  # models up to this size get ORT's layout optimisation in-process
DEFAULT_ENCODER = "facenet"  # a manifest that names no default_encoder (written before there was one)


class Manifest:
    """A parsed `manifest.json` and the directory its files live in."""

    def __init__(self, directory: Path, entries: dict[str, ModelEntry], default_encoder: str = DEFAULT_ENCODER):
        self.directory = directory
        self.entries = entries
        self.default_encoder = default_encoder

    def encoder_name(self, configured: str | None) -> str:
        """The encoder to run: CONFIGURED (`recognition.encoder`) if set, else the manifest's default
        (`facedoor-export --encoder`: INT8 where the exporting CPU has an 8-bit dot product)."""
        return configured or self.default_encoder

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
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
            models = raw["models"]
            default = raw.get("default_encoder", DEFAULT_ENCODER)
            if not isinstance(default, str) or (default != DEFAULT_ENCODER and default not in models):
                raise ValueError(f"default_encoder {default!r} is not one of its models")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"{path}: unreadable model manifest ({exc})") from exc
        entries = {}
        for name, body in models.items():
            try:
                entries[name] = ModelEntry.model_validate({**body, "name": name})
            except ValidationError as exc:
                raise ModelError(f"{path}: model {name!r} breaks the manifest contract: {describe_invalid(exc)} "
                                 f"(re-run facedoor-export)") from None
        return cls(directory, entries, default)

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

    def session(self, name: str, threads: int | None = None, *, layout_optimization: bool = False) -> Any:
        """An ONNX Runtime session for NAME after its hash check (CPU, optional thread cap).

        LAYOUT_OPTIMIZATION applies ORT's NCHWc layout transforms (ORT_ENABLE_ALL) in a child
        process and loads the result with no further optimisation: the fast convolutions
        without the second, reordered copy of the weights that in-process ALL keeps resident
        (FaceNet: 20 ms and 171 MB this way; 20 ms and 313 MB in-process ALL; 26 ms and 215 MB
        EXTENDED). If the child fails, the session falls back to EXTENDED with a warning. A model
        file of at most IN_PROCESS_ALL_BYTES is optimised in-process instead: its copy is small (INT8
        FaceNet, 24 MB: the same RSS either way; MTCNN's R/O-Nets: under 2 MB), and a child costs
        every command about 0.5 s of start-up (it imports ONNX Runtime and writes the graph)."""
        import onnxruntime as ort

        path = self.verify(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # Workers busy-wait only while a run lasts, so they are not put to sleep and woken between
        # a frame's few hundred operators (2 threads, MTCNN + FaceNet: 21.1 -> 18.5 ms a frame),
        # and stop when it returns: workers spinning on between runs starve the capture thread of a
        # 2-core door unit (benchmarks/daemon.py, capture -> subscriber median / p95: never spinning
        # 26.6 / 34.3 ms, spinning during runs 24.5 / 30.3 ms, spinning on 79.7 / 113.6 ms at 19.9 fps).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            if layout_optimization and path.stat().st_size <= IN_PROCESS_ALL_BYTES:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            elif layout_optimization:
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


def int8_dot_product(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the /proc/cpuinfo text CPUINFO) has an 8-bit dot-product instruction
    (x86 AVX-VNNI / AVX512-VNNI, Arm dotprod): ONNX Runtime's u8 x s8 kernels then accumulate in
    32 bits (no saturation) and INT8 weights are both exact and about twice as fast as UINT8."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features"))
             for f in line.partition(":")[2].split()}
    return bool(flags & {"avx512_vnni", "avx_vnni", "asimddp"})


def threshold_warning(threshold: float, entry: ModelEntry) -> str | None:
    """A start-up warning when THRESHOLD accepts more than ENTRY's recommended operating point, else None."""
    if entry.threshold is None or threshold <= entry.threshold:
        return None
    return (
        f"recognition.threshold {threshold:g} is above the {entry.name} encoder's recommended {entry.threshold:g} "
        "(model manifest): a looser match accepts look-alikes more often"
    )


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
