"""Quantization as numpy functions: block quantizers, GPTQ's error feedback, calibration statistics."""
