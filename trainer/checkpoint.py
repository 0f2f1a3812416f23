"""Checkpoints: weights, the table's id map and optimizer state in one safetensors file.

The file's metadata carries the model and table configs (so loading rebuilds exactly what was
trained), the optimizer's hyper-parameters and free-form progress (`epoch`, `step`, metrics,
offsets). Nothing is pickled. Files are written to a temporary name and renamed into place,
so a reader never sees half a checkpoint.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from trainer.model import ModelConfig, build_model
    >>> from trainer.checkpoint import save_checkpoint, load_model
    >>> model = build_model(ModelConfig(dim=8, qk_dim=4, v_dim=4, max_seq_len=5), capacity=10)
    >>> path = Path(tempfile.mkdtemp()) / "ckpt.safetensors"
    >>> save_checkpoint(path, model=model, progress={"epoch": 3})
    >>> restored, progress = load_model(path)
    >>> progress["epoch"], torch.equal(restored.table.weight, model.table.weight)
    (3, True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from config.loader import from_dict, to_dict
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.model import HSTUModel, ModelConfig, build_model


class CheckpointError(ValueError):
    """A checkpoint file is missing, was not written by `save_checkpoint`, or does not fit."""


def save_checkpoint(
    path: str | Path,
    *,
    model: HSTUModel,
    optimizer: torch.optim.Optimizer | None = None,
    progress: dict[str, Any] | None = None,
) -> None:
    """Write model (with table), optional optimizer state and progress to `path` atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for pid, per_param in state["state"].items():
            for key, value in per_param.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
        groups = state["param_groups"]
    metadata = {
        "model_config": json.dumps(to_dict(model.config)),
        "table_config": json.dumps(to_dict(model.table.config)),
        "optimizer_groups": json.dumps(groups),
        "progress": json.dumps(progress or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a checkpoint (configs, optimizer groups, progress)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    missing = [k for k in ("model_config", "table_config", "progress") if k not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks metadata {missing}: it was not written by save_checkpoint")
    return {k: json.loads(v) for k, v in raw.items()}


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[HSTUModel, dict[str, Any]]:
    """Rebuild the model saved at `path` (config from the file) and return it with its progress."""
    meta = read_metadata(path)
    table = DynamicEmbeddingTable(config=from_dict(TableConfig, meta["table_config"]))
    model = build_model(from_dict(ModelConfig, meta["model_config"]), table=table)
    load_into(path, model=model)
    return model.to(device), meta["progress"]


def load_into(path: str | Path, *, model: HSTUModel, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state, if given) from `path` into existing objects."""
    meta = read_metadata(path)
    tensors = load_file(str(path))
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state)
    if optimizer is not None:
        groups = meta.get("optimizer_groups") or []
        if not groups:
            raise CheckpointError(f"{path} holds no optimizer state; pass optimizer=None")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta["progress"]
