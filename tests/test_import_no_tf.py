"""The runtime never loads TensorFlow: importing facedoor and its model/dataset helpers keeps it out."""
from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_runtime_imports_do_not_load_tensorflow():
    modules = ["facedoor", "facedoor.models", "facedoor.datasets", "facedoor.config"]
    if importlib.util.find_spec("facedoor.cli") is not None:
        modules.append("facedoor.cli")
    code = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras', 'tf2onnx'})\n"
        "print(','.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"runtime imports loaded: {proc.stdout.strip()}"
