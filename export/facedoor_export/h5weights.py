"""Load Keras 2 HDF5 weights into a Keras 3 model by layer name, strictly.

Keras 3 cannot read the old files' `model_config`, and a lenient by-name load would silently
leave layers random. Here every stored weight must land in a layer of the same name with the
same shape, and every layer that has weights must receive all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facedoor_export.errors import ExportError


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_h5_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name: array}} of a Keras HDF5 file (full model or weights only).

    Weight names are the part after `layer/` without `:0` (e.g. `kernel`, `moving_mean`).
    An unreadable or truncated file is an ExportError naming the file and the layer.
    """
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ExportError(f"cannot read HDF5 weights {path}: {exc}") from exc
    layers: dict[str, dict[str, np.ndarray]] = {}
    with fh:
        root = fh["model_weights"] if "model_weights" in fh else fh
        if "layer_names" not in root.attrs:
            raise ExportError(f"{path}: not a Keras weights file (no layer_names attribute)")
        names = [_text(n) for n in root.attrs["layer_names"]]
        for layer in tqdm(names, desc=f"reading {path.name}", unit="layer", leave=False):
            try:
                group = root[layer]
                weights = {}
                for wname in (_text(w) for w in group.attrs.get("weight_names", [])):
                    short = wname.split("/")[-1].split(":")[0]
                    weights[short] = np.asarray(group[wname])
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                raise ExportError(f"{path}: layer {layer}: unreadable weights ({exc})") from exc
            if weights:
                layers[layer] = weights
    return layers


def _variable_name(var: Any) -> str:
    return str(getattr(var, "name", "")).split("/")[-1].split(":")[0]


def assign_by_name(model: Any, stored: dict[str, dict[str, np.ndarray]], source: Path) -> int:
    """Set every weight of MODEL from STORED by layer and weight name; return arrays assigned.

    Raises ExportError when a stored layer or weight has no place in the model, a model layer
    gets no weights, or a shape differs.
    """
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    unused = sorted(set(stored) - set(layers))
    if unused:
        raise ExportError(f"{source}: {len(unused)} stored layer(s) not in the model, "
                          f"e.g. {', '.join(unused[:3])}")
    missing = sorted(set(layers) - set(stored))
    if missing:
        raise ExportError(f"{source}: no weights for {len(missing)} model layer(s), "
                          f"e.g. {', '.join(missing[:3])}")
    count = 0
    for name, layer in layers.items():
        arrays = dict(stored[name])
        for var in layer.weights:
            key = _variable_name(var)
            if key not in arrays:
                raise ExportError(f"{source}: layer {name}: weight {key!r} missing "
                                  f"(file has {', '.join(arrays) or 'none'})")
            value = arrays.pop(key)
            if tuple(value.shape) != tuple(var.shape):
                raise ExportError(f"{source}: layer {name}: weight {key!r} has shape "
                                  f"{tuple(value.shape)}, the model needs {tuple(var.shape)}")
            var.assign(value.astype(np.float32))
            count += 1
        if arrays:
            raise ExportError(f"{source}: layer {name}: stored weight(s) "
                              f"{', '.join(arrays)} unused by the model")
    return count
