"""Format knowledge shared by readers and writers: GGUF names, types and keys, the safe GGUF reader,
GGUF ⇄ tokenizer, ONNX folder names."""
