"""The files of an ONNX folder, named once for the exporters, the runtime, `info` and the evaluation."""

MODEL_FILE = "model.onnx"  # the graph
DATA_FILE = "model.onnx.data"  # every weight, as external data (no 2 GiB protobuf limit)
GENAI_CONFIG = "genai_config.json"  # what onnxruntime-genai reads to run the folder
PROVENANCE = "edgelm.json"  # the source checkpoint's hash, the quantization, opsets, tool versions
