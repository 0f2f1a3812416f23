"""trainer/registry.py: atomic, checksummed versions; corrupted ones refused with the reason;
retention; a reader racing the writer only ever sees complete, verified versions."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from config.paths import REPO_ROOT
from trainer.model import ModelConfig, build_model
from trainer.registry import MODEL_FILE, Registry, VersionError

CONFIG = ModelConfig(layout="interleaved", dim=8, qk_dim=4, v_dim=4, max_seq_len=6, num_actions=3, max_candidates=4)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(CONFIG, capacity=20)
    model.table.observe(torch.arange(100, 110), now=float(seed))
    return model


def test_publish_then_load_gives_the_same_model(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    assert registry.latest() is None and registry.versions() == []
    model = small_model()
    manifest = registry.publish(model, offsets={0: 5, 3: 7}, metrics={"hr@10": 0.25}, info={"topic": "t"})
    assert (manifest.version, registry.latest(), registry.versions()) == (1, 1, [1])
    loaded = registry.load()
    assert loaded.manifest.offsets == {0: 5, 3: 7} and loaded.manifest.metrics == {"hr@10": 0.25}
    assert not loaded.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    assert sorted(loaded.vocabulary["raw_ids"].tolist()) == list(range(100, 110))
    ids = torch.tensor([100, 105, 999])
    args = dict(
        item_ids=torch.tensor([100, 101]),
        actions=torch.tensor([0, 1]),
        timestamps_ms=torch.tensor([1000, 2000]),
        candidate_ids=ids,
    )
    assert torch.allclose(model.eval().rank(**args), loaded.model.rank(**args))


def test_retention_keeps_the_last_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path, keep=2)
    for seed in range(4):
        registry.publish(small_model(seed))
    assert registry.versions() == [3, 4] and registry.latest() == 4
    with pytest.raises(VersionError, match=r"version 1 does not exist .*\[3, 4\]"):
        registry.load(1)
    with pytest.raises(ValueError, match="keep"):
        Registry(tmp_path, keep=0)


def test_a_corrupted_version_is_refused_with_the_reason(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.publish(small_model(0))
    registry.publish(small_model(1))
    weights = registry.path_of(2) / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(VersionError, match=r"version 2: model.safetensors has sha256 .* the manifest says"):
        registry.load()
    assert registry.load(1).version == 1  # the older one still loads
    manifest = registry.path_of(1) / "manifest.json"
    body = json.loads(manifest.read_text())
    body["files"]["config.json"] = "0" * 64
    manifest.write_text(json.dumps(body))
    with pytest.raises(VersionError, match="config.json has sha256"):
        registry.load(1)
    manifest.write_text("{not json")
    with pytest.raises(VersionError, match="not a valid manifest"):
        registry.load(1)
    (tmp_path / "LATEST").write_text("latest please")
    with pytest.raises(VersionError, match="not a version name"):
        registry.latest()


def test_a_config_that_does_not_fit_the_weights_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.publish(small_model())
    folder = registry.path_of(1)
    configs = json.loads((folder / "config.json").read_text())
    configs["model"]["dim"] = 16
    (folder / "config.json").write_text(json.dumps(configs))
    body = json.loads((folder / "manifest.json").read_text())
    from trainer.registry import sha256_of

    body["files"]["config.json"] = sha256_of(folder / "config.json")  # checksums fine, content wrong
    (folder / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(VersionError, match="the weights do not load into its config"):
        registry.load()


def _publisher(root: str, count: int) -> None:
    registry = Registry(root, keep=3)
    for seed in range(count):
        registry.publish(small_model(seed), offsets={0: seed})


def test_a_reader_racing_the_writer_sees_only_complete_verified_versions(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    writer = ctx.Process(target=_publisher, args=(str(tmp_path), 12))
    writer.start()
    registry = Registry(tmp_path)
    seen, refused = [], 0
    deadline = time.monotonic() + 120
    while writer.is_alive() and time.monotonic() < deadline:
        latest = registry.latest()
        if latest is None:
            continue
        try:
            loaded = registry.load(latest)
        except VersionError as exc:
            # only possible reason: retention removed it between reading LATEST and loading
            assert "does not exist" in str(exc) or "is missing" in str(exc) or "no manifest" in str(exc), exc
            refused += 1
            continue
        assert loaded.manifest.offsets == {0: latest - 1}
        seen.append(latest)
    writer.join(60)
    assert writer.exitcode == 0
    assert seen == sorted(seen) and len(seen) > 0
    assert registry.load().version == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cli_lists_and_verifies(tmp_path: Path) -> None:
    Registry(tmp_path).publish(small_model(), offsets={1: 2})
    out = subprocess.run(
        [sys.executable, "-m", "trainer.registry", "list", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and '"version": 1' in out.stdout and "(LATEST)" in out.stdout
    (tmp_path / "v1" / "vocabulary.safetensors").write_bytes(b"garbage")
    out = subprocess.run(
        [sys.executable, "-m", "trainer.registry", "verify", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "vocabulary.safetensors has sha256" in out.stderr
