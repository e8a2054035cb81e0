"""edgelm: one small Llama-style checkpoint to every edge format, each checked against the same reference.

`import edgelm` imports neither torch, onnxruntime nor llama_cpp; each is imported when first used.
"""

from edgelm._version import __version__
from edgelm.errors import EdgelmError
from edgelm.evaluation.check import CheckResult, check
from edgelm.evaluation.compare import Comparison, compare
from edgelm.generation.api import Model, load
from edgelm.model.config import ModelConfig

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
