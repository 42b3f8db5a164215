"""Write `manifest.json` in the exact shape `facedoor.models.Manifest.load` reads.

The manifest is rewritten whole (temp file + rename) after every export run: entries of the
groups exported now replace their old ones, entries of other groups are kept if their file is
still there, so `--only` runs never forget models built earlier.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from facedoor import __version__
from facedoor.models import MANIFEST_FORMAT, MANIFEST_NAME, ModelEntry, describe_invalid
from facedoor_export.atomic import atomic_write_bytes
from facedoor_export.errors import ExportError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


def toolchain_versions() -> dict[str, str]:
    """Versions of the tools that shape the ONNX bytes (recorded, and part of freshness)."""
    import tensorflow as tf
    import tf2onnx

    return {"tensorflow_version": tf.__version__, "tf2onnx_version": tf2onnx.__version__}


def source_digest(modules: tuple[str, ...], opset: int) -> str:
    """SHA-256 over the export code of a model group, the shared conversion code and the toolchain.

    A change to any of them makes earlier outputs stale, so `facedoor-export` rebuilds them.
    """
    digest = hashlib.sha256()
    files = sorted({"convert.py", "manifest.py", "atomic.py", *(f"{m}.py" for m in modules)})
    for name in files:
        digest.update(name.encode() + b"\0" + (PACKAGE_DIR / name).read_bytes() + b"\0")
    versions = toolchain_versions()
    digest.update(json.dumps({**versions, "opset": opset, "facedoor": __version__},
                             sort_keys=True).encode())
    return digest.hexdigest()


def read_previous(out: Path) -> dict[str, dict[str, Any]]:
    """Model entries of an existing OUT/manifest.json; {} when absent or unreadable (rebuilt)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        models = raw["models"] if raw.get("format") == MANIFEST_FORMAT else {}
        return {str(k): dict(v) for k, v in models.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable %s (%s); every model will be rebuilt", path, exc)
        return {}


def previous_default_encoder(out: Path) -> str | None:
    """The `default_encoder` of an existing OUT/manifest.json, None when absent or unreadable."""
    try:
        value = json.loads((out / MANIFEST_NAME).read_text()).get("default_encoder")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def write_manifest(out: Path, models: dict[str, dict[str, Any]], opset: int,
                   default_encoder: str | None = None) -> Path:
    """Atomically write OUT/manifest.json listing MODELS (sorted by name) and the DEFAULT_ENCODER the
    door runs when its config names none, each entry first checked against the runtime's contract
    (`facedoor.models.ModelEntry`), so the door can always read it."""
    for name, entry in models.items():
        try:
            ModelEntry.model_validate({**entry, "name": name})
        except ValidationError as exc:
            raise ExportError(f"manifest entry {name!r} breaks the contract: {describe_invalid(exc)}") from None
    body = {
        "format": MANIFEST_FORMAT,
        "facedoor_version": __version__,
        **toolchain_versions(),
        "opset": opset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"default_encoder": default_encoder} if default_encoder in models else {}),
        "models": {name: models[name] for name in sorted(models)},
    }
    path = out / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(body, indent=2) + "\n").encode())
    return path
