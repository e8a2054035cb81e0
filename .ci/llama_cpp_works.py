"""Exit 0 when the installed llama-cpp-python decodes a small model; CI rebuilds it otherwise.

pip caches the wheel it compiled, whatever CMAKE_ARGS were then: a wheel built for another CPU (AVX-512 or
AMX on a machine without them) dies of SIGILL at the first matrix multiply, in the tests' process.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgelm.checkpoint import save_checkpoint, tensor_shapes
from edgelm.export.gguf import export_gguf
from edgelm.model.config import ModelConfig
from edgelm.tokenizer import train_tokenizer

DECODE = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)
llm.eval([0, 5, 6, 7, 8])
"""

with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n" * 20], vocab_size=300)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
        num_hidden_layers=1,
        max_position_embeddings=64,
    )
    rng = np.random.default_rng(0)
    tensors = {
        name: rng.standard_normal(shape).astype(np.float32) * 0.1
        for name, shape in tensor_shapes(config).items()
    }
    save_checkpoint(Path(tmp) / "ckpt", config, tensors, tokenizer)
    for quant in ("f32", "q8_0", "q4_0"):
        path = export_gguf(Path(tmp) / "ckpt", Path(tmp), quant)
        result = subprocess.run([sys.executable, "-c", DECODE, str(path)], capture_output=True)
        if result.returncode != 0:
            print(f"llama-cpp-python fails to decode a {quant} model (exit {result.returncode})")
            sys.exit(1)
print("llama-cpp-python decodes")
