"""Exporters: each writes a format from the reference weights and checks it against the reference.
Heavy dependencies (mlx, gguf, coremltools, onnx) are imported inside each exporter."""
