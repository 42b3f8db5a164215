"""facedoor: the runtime of a face-recognition door unit (ONNX Runtime, OpenCV, MQTT; never TensorFlow)."""
__version__ = "0.1.0"
