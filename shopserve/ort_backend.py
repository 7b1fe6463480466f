"""A Python-based Triton backend that runs ONNX models in ONNX Runtime.

The Triton build inside ``nvidia-pytriton`` has no native ``onnxruntime`` backend. The launcher installs
this file as ``<backends>/onnxruntime/model.py``, so a model config with ``backend: "onnxruntime"`` and a
``model.onnx`` in its version directory is served here on CPU, and by the native backend on a full
Triton build. Requests queued together by the dynamic batcher are grouped by shape and each group runs as
one ONNX Runtime call.

Config parameters (all optional): ``intra_op_threads`` (default 1), ``inter_op_threads`` (default 1),
``pad_ragged_batch`` ("true": requests whose inputs differ in their last axis, as the dynamic batcher
queues them with ``allow_ragged_batch``, are zero-padded to the longest and run as one call; for a
model whose outputs do not depend on padding, such as an encoder with an attention mask).
"""

from __future__ import annotations

import gc
import json
import os
from collections import defaultdict

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _stack(arrays: list[np.ndarray], pad: bool) -> np.ndarray:
    """Concatenate along the batch axis, zero-padding the last axis to the longest when ``pad``."""
    if pad:
        width = max(a.shape[-1] for a in arrays)
        arrays = [np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])]) for a in arrays]
    return np.concatenate(arrays)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        filename = config.get("default_model_filename") or "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "1"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_threads", "1"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each model is its own process on shared cores: idle threads sleep instead of spinning.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", _parameter(config, "allow_spinning", "0")
        )
        self.session = ort.InferenceSession(
            os.path.join(version_dir, filename), options, providers=["CPUExecutionProvider"]
        )
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [item["name"] for item in config["input"]]
        self.input_dtypes = {
            item["name"]: pb_utils.triton_string_to_numpy(item["data_type"])
            for item in config["input"]
        }
        self.output_names = [item["name"] for item in config["output"]]
        self.pad_ragged = _parameter(config, "pad_ragged_batch", "false") == "true"
        gc.freeze()  # collections then skip what was loaded (see triton_adapter.freeze_loaded_state)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)

    def execute(self, requests: list) -> list:
        inputs = [
            {
                name: pb_utils.get_input_tensor_by_name(request, name)
                .as_numpy()
                .astype(self.input_dtypes[name], copy=False)
                for name in self.input_names
            }
            for request in requests
        ]
        outputs: list[list[np.ndarray] | None] = [None] * len(requests)
        if self.batching:
            groups: dict[tuple, list[int]] = defaultdict(list)
            for index, feeds in enumerate(inputs):
                shape = () if self.pad_ragged else (feeds[n].shape[1:] for n in self.input_names)
                groups[tuple(shape)].append(index)
            for members in groups.values():
                batch = {
                    name: _stack([inputs[i][name] for i in members], self.pad_ragged)
                    for name in self.input_names
                }
                results = self._run(batch)
                offset = 0
                for i in members:
                    rows = inputs[i][self.input_names[0]].shape[0]
                    outputs[i] = [result[offset : offset + rows] for result in results]
                    offset += rows
        else:
            for index, feeds in enumerate(inputs):
                outputs[index] = self._run(feeds)
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, value)
                    for name, value in zip(self.output_names, result, strict=True)
                ]
            )
            for result in outputs
        ]
