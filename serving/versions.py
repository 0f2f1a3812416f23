"""Hot-swap of model versions inside a replica: watch the registry, load and verify in the
background, swap one reference between requests.

Ray Serve's `reconfigure` blocks a replica while it runs (ray-project/ray#54509), so routine
swaps do not go through it. Each replica runs a `VersionWatcher` thread that reads the
registry's `LATEST` every `poll_interval_s`. A new version is loaded with `Registry.load` (every
file's sha256 checked against the manifest, configs checked, weights loaded without pickle),
prepared (`ServedVersion.prepare`: it must be a model serving can run, and a smoke scoring pass
must give finite numbers), and only then assigned to `current`. It answers from the version's
`created_ms` plus `activate_delay_s` (ServingConfig), the same moment on every replica, so a
client whose requests land on different replicas never sees the versions go back (when every
replica has loaded it by then; a replica that starts meanwhile waits too, before it takes
traffic). A request reads `current` once when it arrives and keeps that `ServedVersion` to the
end, so requests in flight finish on the version they started with and no request ever sees half
a version.

A version that fails any step is refused: logged with the reason, counted in the Ray metric
`hstu_serving_versions_refused` (tagged with the reason's kind), listed by `GET /version`, and
not tried again; the old version keeps serving. `reconfigure(user_config={"version": N})` pins
N (loading it there and then: a pin or rollback is rare, and blocking that one call is fine);
`{"version": "latest"}` follows the registry again.

    >>> import tempfile
    >>> from trainer.registry import Registry
    >>> from serving.config import ScoreConfig
    >>> watcher = VersionWatcher(registry=Registry(tempfile.mkdtemp()), score=ScoreConfig(), poll_interval_s=1.0)
    >>> watcher.poll() is None and watcher.current is None     # nothing published yet
    True
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.config import FollowConfig, ScoreConfig
from trainer.layout import ModelInputError
from trainer.model import HSTUModel
from trainer.registry import LoadedVersion, Manifest, Registry, VersionError

log = logging.getLogger(__name__)


class VersionRefused(VersionError):
    """A version that loaded but that serving cannot run (wrong layout, actions, non-finite output)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ServedVersion:
    """One verified model version with what serving precomputes for it. Immutable once built."""

    version: int
    model: HSTUModel
    manifest: Manifest
    actions: tuple[str, ...]
    weights: torch.Tensor  # [num_actions] the engagement score's weight per action
    item_embeddings: torch.Tensor  # [num_rows, dim] model.item_embeddings(), for retrieval
    vocab_ids: np.ndarray  # live raw ids, ascending
    vocab_counts: np.ndarray  # their counts (popularity)
    popular_ids: np.ndarray  # live raw ids by count, descending (cold-start retrieval)
    loaded_ms: int

    @property
    def max_events(self) -> int:
        """History events the model conditions on (its max_seq_len; candidates take the next position)."""
        return self.model.config.max_seq_len

    def popularity(self, item_ids: np.ndarray) -> np.ndarray:
        """Vocabulary counts of raw ids (0 for ids the version does not hold)."""
        if len(self.vocab_ids) == 0:
            return np.zeros(len(item_ids), dtype=np.float64)
        pos = np.minimum(np.searchsorted(self.vocab_ids, item_ids), len(self.vocab_ids) - 1)
        return np.where(self.vocab_ids[pos] == item_ids, self.vocab_counts[pos], 0.0)

    @classmethod
    def prepare(cls, loaded: LoadedVersion, *, score: ScoreConfig) -> ServedVersion:
        """Check that serving can run `loaded` and precompute its tables; VersionRefused if not."""
        model, version = loaded.model, loaded.version
        config = model.config
        if config.layout != "interleaved" or config.encoder != "hstu":
            raise VersionRefused(
                f"version {version}: serving ranks with an HSTU model in the interleaved layout, this one is "
                f"encoder {config.encoder!r}, layout {config.layout!r}: train with model.layout=interleaved"
            )
        if config.num_actions != len(score.actions):
            raise VersionRefused(
                f"version {version} predicts {config.num_actions} actions, score.actions names "
                f"{len(score.actions)} ({list(score.actions)}): set score.actions and score.weights to match"
            )
        model.eval()
        try:
            smoke = model.encode_history(
                item_ids=torch.tensor([0, 1]), actions=torch.tensor([0, 0]), timestamps_ms=torch.tensor([0, 1000])
            )
            logits = model.score_candidates(smoke, candidate_ids=torch.tensor([0, 1]))
            query = model.query_embedding(smoke)
        except ModelInputError as error:
            raise VersionRefused(f"version {version}: {error}") from None
        if not (torch.isfinite(logits).all() and torch.isfinite(query).all()):
            raise VersionRefused(f"version {version}: the weights give non-finite scores (NaN or inf): retrain it")
        vocab = loaded.vocabulary
        order = np.argsort(vocab["raw_ids"], kind="stable")
        ids = vocab["raw_ids"][order].astype(np.int64)
        counts = vocab["counts"][order].astype(np.float64)
        with torch.no_grad():
            items = model.item_embeddings()
        return cls(
            version=version,
            model=model,
            manifest=loaded.manifest,
            actions=score.actions,
            weights=torch.tensor(score.weights, dtype=torch.float32),
            item_embeddings=items,
            vocab_ids=ids,
            vocab_counts=counts,
            popular_ids=ids[np.argsort(-counts, kind="stable")],
            loaded_ms=time.time_ns() // 1_000_000,
        )


class _Metrics:
    """The watcher's Ray metrics; inert outside a Ray worker (plain Python use, doctests)."""

    def __init__(self) -> None:
        self.refused = self.swaps = self.version = None
        try:
            import ray
            from ray.util import metrics

            if ray.is_initialized():
                self.refused = metrics.Counter(
                    "hstu_serving_versions_refused",
                    description="Model versions a replica refused to serve (failed load, checksum or checks).",
                    tag_keys=("reason",),
                )
                self.swaps = metrics.Counter("hstu_serving_version_swaps", description="Model versions swapped in.")
                self.version = metrics.Gauge("hstu_serving_model_version", description="The version answering.")
        except Exception as error:  # metrics are a report, never a reason not to serve
            log.warning("Ray metrics unavailable: %r", error)

    def refuse(self, kind: str) -> None:
        if self.refused is not None:
            self.refused.inc(1, tags={"reason": kind})

    def swapped(self, version: int) -> None:
        if self.swaps is not None:
            self.swaps.inc(1)
            self.version.set(version)


class VersionWatcher:
    """Which `ServedVersion` answers now; follows the registry from a background thread."""

    def __init__(
        self, *, registry: Registry, score: ScoreConfig, poll_interval_s: float, activate_delay_s: float = 0.0
    ) -> None:
        self.registry = registry
        self.score = score
        self.poll_interval_s = poll_interval_s
        self.activate_delay_s = activate_delay_s
        self.current: ServedVersion | None = None  # replaced, never mutated: read it once per request
        self.follow = FollowConfig()
        self.refused: dict[int, str] = {}
        self.swaps = 0
        self.last_error: str | None = None
        self._load_lock = threading.Lock()  # one load at a time (the thread or reconfigure)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._metrics = _Metrics()

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        """Load what to serve now (if anything is published), then watch in the background."""
        self.poll()
        self._thread = threading.Thread(target=self._watch, name="registry-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_follow(self, follow: FollowConfig) -> None:
        """Pin a version (loaded now; a version refused before is tried again) or follow LATEST."""
        with self._load_lock:
            self.follow = follow
            if follow.pinned is not None:
                self.refused.pop(follow.pinned, None)
            log.info("following %s", follow.version)
        self.poll()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("registry poll failed; the current version keeps serving")

    # ------------------------------------------------------------------ loading
    def target(self) -> int | None:
        """The version to serve: the pinned one, else the registry's LATEST."""
        if self.follow.pinned is not None:
            return self.follow.pinned
        try:
            return self.registry.latest()
        except VersionError as error:
            self._note_error(str(error))
            return None

    def poll(self) -> ServedVersion | None:
        """Load and swap in the target version if it is new; returns the version answering now."""
        with self._load_lock:
            target = self.target()
            current = self.current
            if target is None or (current is not None and current.version == target) or target in self.refused:
                return self.current
            started = time.perf_counter()
            try:
                served = ServedVersion.prepare(self.registry.load(target), score=self.score)
            except VersionError as error:
                self._refuse(target, str(error), "refused" if isinstance(error, VersionRefused) else "load")
                return self.current
            except Exception as error:  # anything else a broken version folder can raise
                self._refuse(target, f"version {target}: {error!r}", "error")
                return self.current
            if self.follow.pinned is None:  # the same moment on every replica (a pin swaps at once)
                wait_s = served.manifest.created_ms / 1000 + self.activate_delay_s - time.time()
                if wait_s > 0 and self._stop.wait(min(wait_s, self.activate_delay_s)):
                    return self.current
            self.current = served  # the swap: requests that arrive from now on get this version
            self.swaps += 1
            self._metrics.swapped(target)
            log.info(
                "serving version %d (was %s), loaded and verified in %.0f ms",
                target,
                current.version if current is not None else None,
                1000 * (time.perf_counter() - started),
            )
            return served

    def _refuse(self, version: int, reason: str, kind: str) -> None:
        self.refused[version] = reason
        self._note_error(reason)
        self._metrics.refuse(kind)
        serving = self.current.version if self.current is not None else None
        log.error("refused model version %d (%s); still serving version %s", version, reason, serving)

    def _note_error(self, message: str) -> None:
        self.last_error = message

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        """What `GET /version` reports."""
        current = self.current
        manifest = current.manifest if current is not None else None
        return {
            "version": current.version if current is not None else None,
            "created_ms": manifest.created_ms if manifest is not None else None,
            "created": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(manifest.created_ms / 1000))
                if manifest is not None
                else None
            ),
            "offsets": {str(p): o for p, o in sorted(manifest.offsets.items())} if manifest is not None else {},
            "metrics": manifest.metrics if manifest is not None else {},
            "following": self.follow.version,
            "swaps": self.swaps,
            "refused": {str(v): reason for v, reason in sorted(self.refused.items())},
        }
