"""trainer/checkpoint.py: round trips of model, table and optimizer state; bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointError, load_into, load_model, save_checkpoint
from trainer.model import ModelConfig, build_model


def test_round_trip_with_optimizer(tmp_path: Path) -> None:
    config = ModelConfig(layout="interleaved", dim=8, qk_dim=4, v_dim=4, max_seq_len=6, num_actions=3)
    model = build_model(config, capacity=12)
    model.table.observe(torch.arange(1, 9), now=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.table.attach_optimizer(opt)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=model, optimizer=opt, progress={"epoch": 2, "offsets": {"0": 17}})

    restored, progress = load_model(path)
    assert progress == {"epoch": 2, "offsets": {"0": 17}}
    assert restored.config == config and restored.table.config == model.table.config
    a, b = model.state_dict(), restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    opt2 = torch.optim.AdamW(restored.parameters(), lr=0.5)
    load_into(path, model=restored, optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 0.01
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not written by save_checkpoint"):
        load_model(tmp_path / "foreign.safetensors")
    model = build_model(ModelConfig(dim=8, qk_dim=4, v_dim=4, max_seq_len=6), capacity=4)
    save_checkpoint(tmp_path / "no-opt.safetensors", model=model)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_into(tmp_path / "no-opt.safetensors", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
