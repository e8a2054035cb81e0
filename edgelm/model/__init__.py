"""The model: `ModelConfig`, the PyTorch Transformer, rotary embeddings, the torch device."""
