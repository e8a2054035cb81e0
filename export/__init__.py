"""Exporters: checkpoint → ONNX folder, checkpoint → GGUF file."""
