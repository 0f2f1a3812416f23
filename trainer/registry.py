"""The model registry: numbered, checksummed model versions that appear atomically.

A registry is a folder. Each version is a sub-folder `v<N>/` holding

- `model.safetensors`: the weights, the item table's id map included (no pickle anywhere);
- `vocabulary.safetensors`: the live items, raw id -> row, with their counts and last-seen time
  (`DynamicEmbeddingTable.export_vocabulary`), for serving's popularity fallback and inspection;
- `config.json`: the model and table configs the weights were built with;
- `manifest.json`: the version, when it was made, the Kafka offsets it has trained up to, recent
  metrics, and the sha256 of every other file.

`publish` writes a version into a temporary folder, fsyncs it, renames it to `v<N>` (atomic on
one filesystem) and only then replaces the `LATEST` pointer (a temporary file renamed over the
old one). A reader therefore never sees half a version; `load` also verifies every checksum
and the configs before it builds the model, and refuses a version that fails with
`VersionError`, naming what is wrong. A retention policy keeps the last `keep` versions (never the
one `LATEST` names).

    >>> import tempfile
    >>> from trainer.model import ModelConfig, build_model
    >>> from trainer.registry import Registry
    >>> registry = Registry(tempfile.mkdtemp())
    >>> model = build_model(ModelConfig(dim=8, qk_dim=4, v_dim=4, max_seq_len=5), capacity=10)
    >>> registry.publish(model, offsets={0: 120, 1: 98}, metrics={"hr@10": 0.1}).version
    1
    >>> loaded = registry.load()             # the LATEST version, verified
    >>> loaded.version, loaded.manifest.offsets
    (1, {0: 120, 1: 98})

From the command line: `python -m trainer.registry list REGISTRY_DIR` and
`python -m trainer.registry verify REGISTRY_DIR [--version N]`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from config.loader import ConfigError, from_dict, to_dict
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig, TableError
from trainer.model import HSTUModel, ModelConfig, build_model

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.safetensors"
VOCAB_FILE = "vocabulary.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
_VERSION_DIR = re.compile(r"^v(\d+)$")


class VersionError(ValueError):
    """A model version that cannot be used: missing, incomplete, corrupted or inconsistent."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What `manifest.json` holds."""

    version: int
    created_ms: int  # wall clock, ms since the epoch
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset not trained on
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    info: dict[str, Any] = field(default_factory=dict)  # free-form context (topic, steps, events)
    format: int = FORMAT

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "version": self.version,
            "created_ms": self.created_ms,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_ms / 1000)),
            "offsets": {str(p): int(o) for p, o in sorted(self.offsets.items())},
            "metrics": self.metrics,
            "files": self.files,
            "info": self.info,
        }
        return json.dumps(body, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise VersionError(f"{where}: manifest format {raw.get('format')!r}, this code reads {FORMAT}")
            return cls(
                version=int(raw["version"]),
                created_ms=int(raw["created_ms"]),
                offsets={int(p): int(o) for p, o in raw.get("offsets", {}).items()},
                metrics=dict(raw.get("metrics", {})),
                files={str(k): str(v) for k, v in raw["files"].items()},
                info=dict(raw.get("info", {})),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, VersionError):
                raise
            raise VersionError(f"{where}: manifest.json is not a valid manifest ({exc!r})") from None


@dataclass(frozen=True)
class LoadedVersion:
    """A verified version: the model (eval mode, on the requested device), its manifest and vocabulary."""

    version: int
    model: HSTUModel
    manifest: Manifest
    vocabulary: dict[str, np.ndarray]
    path: Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class Registry:
    """A folder of model versions; see the module docstring. Safe for one writer and many readers
    (readers in other processes included); writers take a file lock."""

    def __init__(self, root: str | Path, *, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep ({keep}) must be >= 1: the registry always keeps the latest version")
        self.root = Path(root)
        self.keep = keep

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        """Every complete version present, ascending (temporary folders are not versions)."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> int | None:
        """The version `LATEST` names (None when nothing was published yet)."""
        path = self.root / LATEST_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        match = _VERSION_DIR.match(text)
        if not match:
            raise VersionError(f"{path} holds {text[:40]!r}, not a version name like 'v12'")
        return int(match.group(1))

    def path_of(self, version: int) -> Path:
        return self.root / f"v{version}"

    def manifest(self, version: int) -> Manifest:
        """The manifest of `version` (read, not verified against the files)."""
        path = self.path_of(version) / MANIFEST_FILE
        if not path.is_file():
            raise VersionError(f"version {version} has no {MANIFEST_FILE} in {self.path_of(version)}: not published")
        return Manifest.from_json(path.read_text(), where=f"version {version}")

    def verify(self, version: int) -> Manifest:
        """Check every file of `version` against its manifest; the manifest, or VersionError."""
        folder = self.path_of(version)
        if not folder.is_dir():
            raise VersionError(f"version {version} does not exist in {self.root} (have {self.versions()})")
        manifest = self.manifest(version)
        if manifest.version != version:
            raise VersionError(f"{folder}/manifest.json says version {manifest.version}, the folder is v{version}")
        for name in (MODEL_FILE, VOCAB_FILE, CONFIG_FILE):
            if name not in manifest.files:
                raise VersionError(f"version {version}: the manifest lists no checksum for {name}")
        for name, expected in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise VersionError(f"version {version}: {name} is missing from {folder}")
            actual = sha256_of(path)
            if actual != expected:
                raise VersionError(
                    f"version {version}: {name} has sha256 {actual[:12]}..., the manifest says {expected[:12]}...: "
                    "the file is corrupted or was changed after publishing"
                )
        return manifest

    def load(self, version: int | None = None, *, device: str | torch.device = "cpu") -> LoadedVersion:
        """Verify and load `version` (default: LATEST). Raises VersionError with the reason."""
        if version is None:
            version = self.latest()
            if version is None:
                raise VersionError(f"registry {self.root} has no published version (no {LATEST_FILE})")
        manifest = self.verify(version)
        folder = self.path_of(version)
        try:
            configs = json.loads((folder / CONFIG_FILE).read_text())
            model_config = from_dict(ModelConfig, configs["model"])
            table_config = from_dict(TableConfig, configs["table"])
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise VersionError(f"version {version}: config.json does not describe a model ({exc})") from None
        try:
            model = build_model(model_config, table=DynamicEmbeddingTable(config=table_config))
            model.load_state_dict(load_file(str(folder / MODEL_FILE)))
            vocabulary = load_numpy(str(folder / VOCAB_FILE))
        except (SafetensorError, RuntimeError, TableError, OSError, ValueError) as exc:
            raise VersionError(f"version {version}: the weights do not load into its config ({exc})") from None
        missing = {"raw_ids", "rows", "counts", "last_seen"} - set(vocabulary)
        if missing:
            raise VersionError(f"version {version}: {VOCAB_FILE} lacks {sorted(missing)}")
        model.eval()
        return LoadedVersion(
            version=version, model=model.to(device), manifest=manifest, vocabulary=vocabulary, path=folder
        )

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".publish.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def publish(
        self,
        model: HSTUModel,
        *,
        offsets: dict[int, int] | None = None,
        metrics: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write `model` as the next version, then point LATEST at it; apply the retention policy."""
        with self._lock():
            version = max(self.versions(), default=0) + 1
            tmp = self.root / f".tmp-v{version}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, str(tmp / MODEL_FILE), metadata={"format": str(FORMAT)})
                save_numpy(model.table.export_vocabulary(), str(tmp / VOCAB_FILE))
                configs = {"model": to_dict(model.config), "table": to_dict(model.table.config)}
                _write_file(tmp / CONFIG_FILE, json.dumps(configs, indent=1).encode())
                for name in (MODEL_FILE, VOCAB_FILE):
                    with open(tmp / name, "rb+") as fh:
                        os.fsync(fh.fileno())
                manifest = Manifest(
                    version=version,
                    created_ms=time.time_ns() // 1_000_000,
                    offsets=dict(offsets or {}),
                    metrics=dict(metrics or {}),
                    files={name: sha256_of(tmp / name) for name in (MODEL_FILE, VOCAB_FILE, CONFIG_FILE)},
                    info=dict(info or {}),
                )
                _write_file(tmp / MANIFEST_FILE, manifest.to_json().encode())
                _fsync_dir(tmp)
                os.rename(tmp, self.path_of(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._point_latest(version)
            self._retain(version)
        log.info("published model version %d to %s (offsets %s)", version, self.root, manifest.offsets)
        return manifest

    def _point_latest(self, version: int) -> None:
        tmp = self.root / f".{LATEST_FILE}.tmp-{os.getpid()}"
        _write_file(tmp, f"v{version}\n".encode())
        os.replace(tmp, self.root / LATEST_FILE)
        _fsync_dir(self.root)

    def _retain(self, latest: int) -> None:
        for old in self.versions()[: -self.keep]:
            if old != latest:
                shutil.rmtree(self.path_of(old), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.registry list|verify REGISTRY_DIR [--version N]`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.registry", description="Inspect a model registry.")
    parser.add_argument("command", choices=("list", "verify"))
    parser.add_argument("root", type=Path)
    parser.add_argument("--version", type=int, help="default: LATEST")
    args = parser.parse_args(argv)
    registry = Registry(args.root)
    try:
        if args.command == "list":
            latest = registry.latest()
            for version in registry.versions():
                manifest = registry.manifest(version)
                marker = " (LATEST)" if version == latest else ""
                print(
                    json.dumps(
                        {
                            "version": version,
                            "created_ms": manifest.created_ms,
                            "offsets": manifest.offsets,
                            "metrics": manifest.metrics,
                        }
                    )
                    + marker
                )
            return 0
        version = args.version if args.version is not None else registry.latest()
        if version is None:
            raise VersionError(f"registry {args.root} has no published version")
        manifest = registry.verify(version)
        print(f"version {version}: {len(manifest.files)} files verified")
        return 0
    except VersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
