"""The ONNX Runtime runtime: runs an ONNX folder (edgelm's, onnxruntime-genai's or optimum's) on CPU, CUDA,
CoreML (macOS) or DirectML (Windows).

Folders with GroupQueryAttention (edgelm's and onnxruntime-genai's) keep one KV buffer per layer, allocated
once for the whole context and bound as both the past input and the present output, so the decode loop
allocates nothing but its logits. Other folders (optimum's plain attention) feed each step's present
tensors back as the next step's past, without copying them.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort

from edgelm.errors import EdgelmError
from edgelm.formats.onnx import MODEL_FILE, read_onnx_folder
from edgelm.runtimes.base import HeldIds, check_ids, checked_threads, ids_to_run, keepable, reserved_context
from edgelm.tokenizer import Tokenizer

# device → the execution providers to ask for, in order of preference (CPU last as ORT's own fallback)
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "coreml": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
    "dml": ["DmlExecutionProvider", "CPUExecutionProvider"],
}
_ALIASES = {"mps": "coreml", "metal": "coreml", "directml": "dml", "gpu": "cuda"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def resolve_device(device: str) -> str:
    """ "auto" → cuda, then CoreML on macOS or DirectML on Windows when this onnxruntime has it, else cpu."""
    available = ort.get_available_providers()
    if device == "auto":
        candidates = ["cuda", "coreml" if platform.system() == "Darwin" else "dml"]
        return next((d for d in candidates if PROVIDERS[d][0] in available), "cpu")
    kind = _ALIASES.get(device.split(":")[0], device.split(":")[0])
    if kind not in PROVIDERS:
        raise EdgelmError(f"unknown device {device!r} for onnxruntime; use auto, cpu, cuda, coreml or dml")
    if PROVIDERS[kind][0] not in available:
        package = {"cuda": "onnxruntime-gpu", "dml": "onnxruntime-directml"}.get(kind, "onnxruntime")
        raise EdgelmError(
            f"device {device} requested but this onnxruntime has no {PROVIDERS[kind][0]} "
            f"(available: {', '.join(available)}); install {package}"
        )
    return device if kind == "cuda" else kind


class OnnxRuntime(HeldIds):
    """An ONNX decoder in an ONNX Runtime session, with its KV cache holding one sequence."""

    name: ClassVar[str] = "onnxruntime"
    artifacts: ClassVar[tuple[str, ...]] = ("onnx",)
    options: ClassVar[frozenset[str]] = frozenset({"threads", "context"})

    def __init__(
        self, path: Path, device: str = "auto", threads: int | None = None, context: int | None = None
    ) -> None:
        """`context`: the tokens the KV buffers hold (default DEFAULT_CONTEXT, at most the model's)."""
        folder = Path(path)
        file = folder / MODEL_FILE
        config, graph = read_onnx_folder(folder)
        # the KV buffers are allocated for the whole context up front
        self.config = dataclasses.replace(config, max_position_embeddings=reserved_context(context, config))
        self.tokenizer = Tokenizer.load(folder)
        self.device = resolve_device(device)
        self._shared_kv = any(node.op_type == "GroupQueryAttention" for node in graph.graph.node)
        kind = self.device.split(":")[0]
        if kind == "cuda" and self._shared_kv and _past_type(graph) == onnx.TensorProto.FLOAT:
            raise EdgelmError(
                f"{folder} computes in float32, and ONNX Runtime's CUDA GroupQueryAttention runs only "
                "float16/bfloat16: export with --quant fp16 for CUDA, or use --device cpu"
            )
        del graph

        options = ort.SessionOptions()
        if (count := checked_threads(threads)) is not None:
            options.intra_op_num_threads = count
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about nodes ORT places on CPU are not errors
        providers: list = list(PROVIDERS[kind])
        if kind == "cuda" and ":" in self.device:
            providers[0] = (providers[0], {"device_id": int(self.device.split(":")[1])})
        try:
            self.session = ort.InferenceSession(str(file), options, providers=providers)
        except Exception as e:  # onnxruntime's own exception types are not exported consistently
            reason = " ".join(str(e).split())  # ORT's messages run over several lines
            raise EdgelmError(f"{file}: ONNX Runtime cannot load it ({reason[:400]})") from None
        self.providers = self.session.get_providers()  # those that actually hold nodes, preferred first
        self.provider: str | None = self.providers[0] if self.providers else None
        self.threads = threads
        self._lock = threading.Lock()
        self._setup_io()
        self._held: list[int] = []  # the sequence's ids, whose keys and values the KV buffers hold

    def _setup_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self._past = sorted(n for n in inputs if n.startswith("past_key_values."))
        self._present = [n.replace("past_key_values.", "present.") for n in self._past]
        missing = {"input_ids", "logits"} - set(inputs) - set(outputs) | (set(self._present) - set(outputs))
        if missing:
            raise EdgelmError(
                f"the ONNX model lacks {', '.join(sorted(missing))}: not a decoder with a KV cache"
            )
        self._position_ids = "position_ids" in inputs
        past_type = inputs[self._past[0]].type if self._past else "tensor(float)"
        self._kv_dtype = _NUMPY_TYPES.get(past_type, np.float32)
        c = self.config
        self._ort_device = "cuda" if self.device.startswith("cuda") else "cpu"
        self._device_id = device_id = int(self.device.split(":")[1]) if ":" in self.device else 0
        self._mask = np.ones((1, c.max_position_embeddings), np.int64)
        self._binding = self.session.io_binding()
        if self._shared_kv:
            # one buffer per past/present pair, bound as both: GroupQueryAttention appends in place
            shape = (1, c.num_key_value_heads, c.max_position_embeddings, c.head_dim)
            self._kv = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self._ort_device, device_id)
                for _ in self._past
            ]
            for past, present, value in zip(self._past, self._present, self._kv, strict=True):
                self._binding.bind_ortvalue_input(past, value)
                self._binding.bind_ortvalue_output(present, value)
        else:
            self._kv = [None] * len(self._past)  # the present tensors of the last step
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = _NUMPY_TYPES.get(logits_type, np.float32)
        # ORT writes the logits into these numpy arrays; numpy reads them without a call into ORT
        self._decode_array = np.empty((1, 1, c.vocab_size), self._logits_dtype)
        self._decode_logits = ort.OrtValue.ortvalue_from_numpy(self._decode_array)
        self._token = np.zeros((1, 1), np.int64)  # ORT reads the decode step's token id from this array
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self._token)
        self._decode_bound = False

    def reset(self) -> None:
        """Forget the sequence: the next `forward` starts at position 0."""
        self.keep(0)

    def keep(self, n: int) -> int:
        """Keep the first `n` tokens of the sequence and forget the rest; returns how many it kept. The
        shared KV buffers' later entries are overwritten as the sequence grows again; plain attention's
        past tensors are cut to the kept length."""
        with self._lock:
            kept = keepable(self.config, len(self._held), n)
            if not self._shared_kv and kept and self._kv and self._kv[0].shape()[2] != kept:
                self._kv = [
                    ort.OrtValue.ortvalue_from_numpy(
                        np.ascontiguousarray(value.numpy()[:, :, :kept]), self._ort_device, self._device_id
                    )
                    for value in self._kv
                ]
            self._held = self._held[:kept]
            return kept

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; float32 logits (len(ids), vocab), or (1, vocab) for the last."""
        with self._lock:
            if self.session is None:
                raise EdgelmError("this runtime has been closed; load the model again")
            array = check_ids(ids, self.config.vocab_size, self.position, self.config.max_position_embeddings)
            logits = self._run(*ids_to_run(self.config, self._held, array))[-array.size :]
            self._held.extend(array.tolist())
        return logits if all_logits else logits[-1:]

    def _run(self, start: int, array: np.ndarray) -> np.ndarray:
        n = array.size
        binding = self._binding
        if n == 1:  # decode: the one-token input and the logits buffer stay bound from step to step
            self._token[0, 0] = array[0]
            if not self._decode_bound:
                binding.bind_ortvalue_input("input_ids", self._token_value)
                binding.bind_ortvalue_output("logits", self._decode_logits)
                self._decode_bound = True
            logits = self._decode_array
        else:
            logits = np.empty((1, n, self.config.vocab_size), self._logits_dtype)
            binding.bind_cpu_input("input_ids", array.reshape(1, n))
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            self._decode_bound = False
        binding.bind_cpu_input("attention_mask", self._mask[:, : start + n])
        if self._position_ids:
            binding.bind_cpu_input("position_ids", np.arange(start, start + n, dtype=np.int64)[None])
        present = None if self._shared_kv else self._bind_growing_past(start, n)
        self.session.run_with_iobinding(binding)
        if present is not None:  # only once the step has run: a failed one leaves the past as it was
            self._kv = present
        # the decode buffer is reused, so its logits are copied; a prefill's buffer is the caller's to keep
        return logits[0].astype(np.float32, copy=logits is self._decode_array)

    def _bind_growing_past(self, start: int, n: int) -> list[ort.OrtValue]:
        """Plain attention: the last step's present tensors are this step's past (empty at the start), and
        new buffers one step longer, returned, receive this step's present tensors."""
        c = self.config
        shape = (1, c.num_key_value_heads, start + n, c.head_dim)
        buffers = []
        for i, (past, present) in enumerate(zip(self._past, self._present, strict=True)):
            if start == 0:
                empty = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), self._kv_dtype)
                self._binding.bind_cpu_input(past, empty)
            else:
                self._binding.bind_ortvalue_input(past, self._kv[i])
            buffers.append(
                ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, self._kv_dtype, self._ort_device, self._device_id
                )
            )
            self._binding.bind_ortvalue_output(present, buffers[-1])
        return buffers

    def close(self) -> None:
        """Release the session and the KV buffers."""
        with self._lock:
            self.session = None
            self._binding = None
            self._kv = []


def _past_type(model: onnx.ModelProto) -> int:
    """The element type of the first past key input (float32 when there is none)."""
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            return value.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT
