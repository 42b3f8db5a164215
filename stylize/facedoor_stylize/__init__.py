"""`facedoor-stylize`: Gatys neural style transfer on ONNX Runtime (VGG-19 loss + gradient graph)."""
