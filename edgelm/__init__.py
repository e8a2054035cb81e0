"""edgelm: one small Llama-style checkpoint to every edge format, each checked against the same reference.

`import edgelm` imports neither torch, onnxruntime nor llama_cpp; each is imported when first used.
"""

from edgelm.api import Model, load
from edgelm.checking import CheckResult, check
from edgelm.comparison import Comparison, compare
from edgelm.config import ModelConfig
from edgelm.errors import EdgelmError

__version__ = "0.1.0"
__all__ = [
    "CheckResult",
    "Comparison",
    "EdgelmError",
    "Model",
    "ModelConfig",
    "__version__",
    "check",
    "compare",
    "load",
]
