"""The door never loads TensorFlow, and `facedoor list` never loads OpenCV, ONNX Runtime or paho."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _loaded_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter running CODE."""
    probe = code + "\nimport sys\nprint(','.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.strip().splitlines()[-1].split(","))


def test_no_runtime_module_loads_tensorflow() -> None:
    code = (
        "import pkgutil, importlib, facedoor\n"
        "for m in pkgutil.walk_packages(facedoor.__path__, 'facedoor.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    loaded = _loaded_after(code)
    assert "facedoor" in loaded and "cv2" in loaded  # every runtime module really was imported
    assert not loaded & {"tensorflow", "keras", "tf2onnx"}


def test_facedoor_list_loads_no_heavy_module(tmp_path: Path) -> None:
    code = ("from facedoor.cli import main\n"
            f"main(['--store', {str(tmp_path / 'none.db')!r}, 'list'])\n")
    loaded = _loaded_after(code)
    assert "facedoor" in loaded
    assert not loaded & {"cv2", "onnxruntime", "paho", "tensorflow", "scipy"}
