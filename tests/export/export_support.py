"""Export test helpers: random weights written in the exact on-disk formats the exporter reads."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def randomize(model: Any, seed: int = 0) -> None:
    """Give MODEL plausible random weights (positive variances, unit-ish gammas)."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.path.split("/")[-1]
        if name == "moving_variance":
            value = rng.uniform(0.5, 1.5, var.shape)
        elif name == "gamma":
            value = rng.uniform(0.8, 1.2, var.shape)
        else:
            value = rng.normal(0.0, 0.05, var.shape)
        var.assign(value.astype(np.float32))


def write_keras2_h5(model: Any, path: Path, extra_layer: str | None = None) -> None:
    """Save MODEL's weights as a Keras 2 full-model HDF5 does: model_weights/<layer>/<layer>/<w>:0."""
    import h5py

    with h5py.File(path, "w") as fh:
        root = fh.create_group("model_weights")
        names = []
        for layer in model.layers:
            names.append(layer.name)
            group = root.create_group(layer.name)
            weight_names = []
            for var in layer.weights:
                wname = f"{layer.name}/{var.path.split('/')[-1]}:0"
                group.create_dataset(wname, data=np.asarray(var.numpy()))
                weight_names.append(wname.encode())
            group.attrs["weight_names"] = weight_names
        if extra_layer:
            names.append(extra_layer)
            group = root.create_group(extra_layer)
            group.create_dataset(f"{extra_layer}/kernel:0", data=np.zeros((2, 2), np.float32))
            group.attrs["weight_names"] = [f"{extra_layer}/kernel:0".encode()]
        root.attrs["layer_names"] = [n.encode() for n in names]
        root.attrs["keras_version"] = b"2.1.2"
        root.attrs["backend"] = b"tensorflow"


def write_openface_csvs(model: Any, directory: Path) -> list[str]:
    """Write MODEL's weights as the OpenFace Torch export does: one comma-separated line per tensor."""
    from facedoor_export.openface import csv_files

    directory.mkdir(parents=True, exist_ok=True)
    for name, (layer, weight, shape) in csv_files(model).items():
        value = np.asarray(getattr(model.get_layer(layer), weight).numpy())
        if len(shape) == 4:
            value = value.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
        elif len(shape) == 2:
            value = value.T
        assert value.shape == shape
        (directory / name).write_text(",".join(f"{v:.9g}" for v in value.ravel()) + "\n")
    return sorted(csv_files(model))


def onnx_leftovers(directory: Path) -> list[str]:
    """Model files, manifests or temp files in DIRECTORY (none may remain after a failed export)."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir())
