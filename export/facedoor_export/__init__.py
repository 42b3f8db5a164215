"""facedoor_export: build-time conversion of pretrained Keras models to verified ONNX (TensorFlow + tf2onnx)."""
from facedoor import __version__

__all__ = ["__version__"]
