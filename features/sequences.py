"""Read and write many users' rolling sequences in one call, through Feast's online store.

The streaming job reads the sequences of every user in a micro-batch, appends the new events and
writes them back; serving reads them to rank. Both go through `SequenceStore`, which applies the
Feast repository (`features/definitions.py`, `features/feature_store*.yaml`) on first use and
then writes and reads the online store's rows in bulk (features/online_rows.py: the bytes
Feast's provider would write, built and parsed with numpy, one `executemany` or Redis pipeline
per call). `bulk_io=False` goes through the provider instead: one `online_read` and one
`online_write_batch` per call, with one protobuf message per value built here. Feast's DataFrame
path (`FeatureStore.write_to_online_store` / `push`) and `get_online_features` are slower for
the same rows (`measure_batch_io` times the write paths).

Sequences travel as a `SequenceBatch`: jagged int64 arrays, sequence `i` being
`item_ids[offsets[i]:offsets[i + 1]]` (oldest first), with `actions` as int64 codes into the
action vocabulary and `timestamps` in ms. Ids are never converted to floats, so int64 ids above
2**53 come back exactly. A user with no stored row comes back with an empty sequence and the
watermark (`last_partition`, `last_offset`) = (-1, -1).

    >>> import numpy as np
    >>> from features.sequences import SequenceBatch, SequenceStore, SequenceStoreConfig
    >>> store = SequenceStore(SequenceStoreConfig(max_len=200))      # SQLite under .state/feast/
    >>> store.write_many(SequenceBatch.from_sequences(
    ...     user_ids=[2**60 + 1], item_ids=[[2**62 + 3, 7]], actions=[[4, 0]],
    ...     timestamps=[[1_700_000_000_000, 1_700_000_000_500]],
    ...     last_partition=[2], last_offset=[41]))
    >>> batch = store.read_many(np.array([2**60 + 1, 5], dtype=np.int64))
    >>> batch.sequence(0).item_ids.tolist(), batch.sequence(1).last_offset
    ([4611686018427387907, 7], -1)

`online_store="redis"` uses `features/feature_store.redis.yaml` against `redis_address`.
Write semantics are last-write-wins per user on both stores; ordering writes (by watermark) is
the caller's job. `python -m features.sequences` prints the batch read/write figures.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence, TypeVar

import numpy as np
import pandas as pd
import redis
import yaml
from feast import FeatureStore, FeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from features.definitions import (
    EVENT_TIMESTAMP,
    FEATURES,
    USER_ID,
    USER_SEQUENCE,
    USER_SEQUENCE_PUSH,
    feast_objects,
)
from infra.paths import state_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

FEATURES_DIR = Path(__file__).resolve().parent
CONFIG_FILES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
# Feast's SQLite read binds one parameter per key in one IN (...) query, and SQLite (>= 3.32)
# allows 32766 per statement; 10k keys per query keeps the common batch size to one query.
_READ_CHUNK = 10_000
_INT64_FIELDS = ("user_ids", "offsets", "item_ids", "actions", "timestamps",
                 "last_partition", "last_offset")


class SequenceBatchError(ValueError):
    """A `SequenceBatch` (or the ids passed to `read_many`) breaks the data contract."""


class SequenceStoreError(RuntimeError):
    """The online store could not be opened or applied."""


class UserSequence(NamedTuple):
    """One user's rolling sequence: arrays oldest first, and its watermark."""

    user_id: int
    item_ids: np.ndarray
    actions: np.ndarray
    timestamps: np.ndarray
    last_partition: int
    last_offset: int


@dataclass(frozen=True, kw_only=True, eq=False)
class SequenceBatch:
    """Many users' rolling sequences as jagged int64 arrays.

    `user_ids`, `last_partition`, `last_offset`: shape (B,). `offsets`: shape (B + 1,), starting
    at 0, non-decreasing. `item_ids`, `actions`, `timestamps`: shape (offsets[-1],); user `i`'s
    events are `[offsets[i], offsets[i + 1])`, oldest first. Every array is 1-D int64; nothing is
    converted, so a float array (which cannot hold ids above 2**53 exactly) is rejected.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    item_ids: np.ndarray
    actions: np.ndarray
    timestamps: np.ndarray
    last_partition: np.ndarray
    last_offset: np.ndarray

    def __post_init__(self) -> None:
        for name in _INT64_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != np.int64 or value.ndim != 1:
                got = (f"dtype {value.dtype}, shape {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise SequenceBatchError(
                    f"SequenceBatch.{name} must be a 1-D int64 numpy array, got {got}: "
                    "build it with np.asarray(values, dtype=np.int64) or use "
                    "SequenceBatch.from_sequences"
                )
        num_users = len(self.user_ids)
        for name in ("last_partition", "last_offset"):
            if len(getattr(self, name)) != num_users:
                raise SequenceBatchError(
                    f"SequenceBatch.{name} has {len(getattr(self, name))} entries but user_ids "
                    f"has {num_users}: give one watermark per user"
                )
        if len(self.offsets) != num_users + 1:
            raise SequenceBatchError(
                f"SequenceBatch.offsets has {len(self.offsets)} entries, expected "
                f"len(user_ids) + 1 = {num_users + 1}"
            )
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0):
            raise SequenceBatchError(
                f"SequenceBatch.offsets must start at 0 and never decrease, got "
                f"{self.offsets[:8].tolist()}{'...' if len(self.offsets) > 8 else ''}"
            )
        total = int(self.offsets[-1])
        for name in ("item_ids", "actions", "timestamps"):
            if len(getattr(self, name)) != total:
                raise SequenceBatchError(
                    f"SequenceBatch.{name} has {len(getattr(self, name))} events but "
                    f"offsets[-1] is {total}: every event needs an item, an action and a timestamp"
                )
        for name in ("last_partition", "last_offset"):
            below = np.flatnonzero(getattr(self, name) < -1)
            if len(below):
                i = int(below[0])
                raise SequenceBatchError(
                    f"SequenceBatch.{name} of user {int(self.user_ids[i])} is "
                    f"{int(getattr(self, name)[i])}: use -1 for 'no event applied yet'"
                )

    @classmethod
    def from_sequences(
        cls,
        *,
        user_ids: Sequence[int] | np.ndarray,
        item_ids: Sequence[Sequence[int] | np.ndarray],
        actions: Sequence[Sequence[int] | np.ndarray],
        timestamps: Sequence[Sequence[int] | np.ndarray],
        last_partition: Sequence[int] | np.ndarray,
        last_offset: Sequence[int] | np.ndarray,
    ) -> SequenceBatch:
        """Build a batch from one list of ints per user (ints, not floats: ids must be exact)."""
        lengths = [len(seq) for seq in item_ids]
        for name, seqs in (("actions", actions), ("timestamps", timestamps)):
            other = [len(seq) for seq in seqs]
            if other != lengths:
                raise SequenceBatchError(
                    f"{name} lengths {other[:8]} differ from item_ids lengths {lengths[:8]}: "
                    "give each user one action and one timestamp per item"
                )
        if len(lengths) != len(user_ids):
            raise SequenceBatchError(
                f"{len(lengths)} sequences for {len(user_ids)} user_ids: give one per user"
            )

        def flat(seqs: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
            parts = [_as_int64(seq) for seq in seqs]
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

        return cls(
            user_ids=_as_int64(user_ids),
            offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            item_ids=flat(item_ids),
            actions=flat(actions),
            timestamps=flat(timestamps),
            last_partition=_as_int64(last_partition),
            last_offset=_as_int64(last_offset),
        )

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Events per user, shape (B,)."""
        return np.diff(self.offsets)

    def sequence(self, i: int) -> UserSequence:
        """User `i` of the batch (views into the batch's arrays, not copies)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return UserSequence(
            user_id=int(self.user_ids[i]),
            item_ids=self.item_ids[start:end],
            actions=self.actions[start:end],
            timestamps=self.timestamps[start:end],
            last_partition=int(self.last_partition[i]),
            last_offset=int(self.last_offset[i]),
        )

    def __iter__(self) -> Iterator[UserSequence]:
        return (self.sequence(i) for i in range(len(self)))

    def equals(self, other: SequenceBatch) -> bool:
        """True when both batches hold the same users, events and watermarks, in order."""
        return all(np.array_equal(getattr(self, name), getattr(other, name))
                   for name in _INT64_FIELDS)

    def to_pandas(self, *, event_timestamp: datetime) -> pd.DataFrame:
        """One row per user in the layout of the push source (for `FeatureStore.push`)."""
        cut = self.offsets[1:-1]
        return pd.DataFrame({
            USER_ID: self.user_ids,
            "item_ids": np.split(self.item_ids, cut),
            "actions": np.split(self.actions, cut),
            "timestamps": np.split(self.timestamps, cut),
            "last_partition": self.last_partition,
            "last_offset": self.last_offset,
            EVENT_TIMESTAMP: pd.Series([event_timestamp] * len(self), dtype="datetime64[us, UTC]"),
        })


def take_users(batch: SequenceBatch, rows: np.ndarray) -> SequenceBatch:
    """The sub-batch of users at `rows` (vectorised gather of their jagged slices)."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = batch.lengths[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    src = np.repeat(batch.offsets[rows] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return SequenceBatch(
        user_ids=batch.user_ids[rows],
        offsets=offsets,
        item_ids=batch.item_ids[src],
        actions=batch.actions[src],
        timestamps=batch.timestamps[src],
        last_partition=batch.last_partition[rows],
        last_offset=batch.last_offset[rows],
    )


def concat_batches(batches: Sequence[SequenceBatch]) -> SequenceBatch:
    """The users of `batches`, one after the other (no check that they are distinct)."""
    if not batches:
        return SequenceBatch.from_sequences(user_ids=[], item_ids=[], actions=[], timestamps=[],
                                            last_partition=[], last_offset=[])
    if len(batches) == 1:
        return batches[0]
    starts = np.cumsum([0] + [int(b.offsets[-1]) for b in batches[:-1]])
    offsets = np.concatenate([[0]] + [b.offsets[1:] + s for b, s in zip(batches, starts)]).astype(np.int64)
    return SequenceBatch(
        user_ids=np.concatenate([b.user_ids for b in batches]),
        offsets=offsets,
        item_ids=np.concatenate([b.item_ids for b in batches]),
        actions=np.concatenate([b.actions for b in batches]),
        timestamps=np.concatenate([b.timestamps for b in batches]),
        last_partition=np.concatenate([b.last_partition for b in batches]),
        last_offset=np.concatenate([b.last_offset for b in batches]),
    )


def _as_int64(values: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise SequenceBatchError(
            f"expected integer ids, got dtype {array.dtype} (e.g. {array.ravel()[:3].tolist()}): "
            "floats cannot hold int64 ids above 2**53 exactly, pass ints"
        )
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise SequenceBatchError(f"id {int(array.max())} does not fit in int64")
    return array.astype(np.int64, copy=False).ravel()


@dataclass(frozen=True, kw_only=True)
class SequenceStoreConfig:
    """Where the sequences live and how long they may be.

    max_len: the longest sequence `write_many` accepts (the streaming job's rolling window).
    online_store: "sqlite" (default, a file under the state folder) or "redis".
    redis_address: "host:port" of the Redis server when online_store is "redis".
    state_dir: the folder that holds the Feast repository (registry, SQLite file, offline
      files); None means `infra.paths.state_dir("feast")`. Each online store gets a subfolder.
    bulk_io: write and read the rows with features/online_rows.py (the same bytes, built and
      parsed with numpy: 2-4x faster on the 2-core box, see benchmarks/RESULTS.md); False goes
      through the provider's `online_write_batch` / `online_read`, one protobuf message per value.
    """

    max_len: int
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_address: str = "127.0.0.1:6379"
    state_dir: Path | None = None
    bulk_io: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1:
            raise ValueError(f"max_len ({self.max_len!r}) must be a positive int")
        if self.online_store not in CONFIG_FILES:
            raise ValueError(
                f"online_store ({self.online_store!r}) must be one of {sorted(CONFIG_FILES)}"
            )
        host, sep, port = self.redis_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"redis_address ({self.redis_address!r}) must be 'host:port', e.g. '127.0.0.1:6379'"
            )
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            raise ValueError(f"state_dir ({self.state_dir!r}) must be a pathlib.Path or None")


class SequenceStore:
    """Batched reads and writes of `user_sequence` rows; applies the Feast repository on first use.

    One instance per process (it holds the online store's connection). Safe to open from many
    processes at once: the first use of each takes a file lock around `apply`.
    """

    def __init__(self, config: SequenceStoreConfig) -> None:
        self.config = config
        root = config.state_dir if config.state_dir is not None else state_dir("feast")
        self.repo_dir = root / config.online_store
        self._opened: tuple[FeatureStore, FeatureView] | None = None
        self._bulk = None  # features.online_rows.SqliteRows / RedisRows, opened with the store

    @property
    def feature_store(self) -> FeatureStore:
        """The applied Feast `FeatureStore` (for `push`, `get_online_features`, the CLI's view)."""
        return self._open()[0]

    def _open(self) -> tuple[FeatureStore, FeatureView]:
        """The store and the registered `user_sequence` view; applies the repository once."""
        if self._opened is not None:
            return self._opened
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        if self.config.online_store == "redis":
            self._check_redis()
        # Apply is a read-modify-write of the registry file: one process at a time.
        with open(self.repo_dir / ".apply.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yaml_path = self._write_repo_config()
            store = FeatureStore(repo_path=str(self.repo_dir), fs_yaml_file=yaml_path)
            try:
                store.apply(feast_objects().all())
            except (OSError, ValueError, sqlite3.Error) as error:
                raise self._apply_error(error) from error
            self._opened = (store, store.get_feature_view(USER_SEQUENCE))
            if self.config.bulk_io:
                from features.online_rows import RowLayoutError

                try:
                    self._bulk = self._open_bulk(*self._opened)
                except RowLayoutError as error:  # a table layout we do not write: the provider's path
                    log.warning("bulk I/O off, using Feast's provider: %s", error)
        log.info("feast repository applied in %s (%s online store)",
                 self.repo_dir, self.config.online_store)
        return self._opened

    def _open_bulk(self, store: FeatureStore, view: FeatureView):
        """The bulk row writer/reader for this store (features/online_rows.py)."""
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id
        from google.protobuf.timestamp_pb2 import Timestamp

        from features import online_rows
        from features.redis_pipe import RedisPipe

        version = store.config.entity_key_serialization_version

        def serialize_one(user_id: int) -> bytes:
            return serialize_entity_key(_entity_key(user_id), entity_key_serialization_version=version)

        if self.config.online_store == "sqlite":
            table = _table_id(store.config.project, view,
                              store.config.registry.enable_online_feature_view_versioning)
            return online_rows.SqliteRows(SqliteOnlineStore._get_db_path(store.config), table, serialize_one)

        def timestamp_bytes(now: datetime) -> bytes:
            ts = Timestamp()
            ts.FromDatetime(now)
            return ts.SerializeToString()

        host, _, port = self.config.redis_address.rpartition(":")
        return online_rows.RedisRows(RedisPipe(host, int(port)), store.config.project, view.name,
                                     serialize_one, _mmh3, timestamp_bytes)

    def _write_repo_config(self) -> Path:
        """Copy features/feature_store*.yaml into repo_dir (with redis_address); return its path."""
        template = FEATURES_DIR / CONFIG_FILES[self.config.online_store]
        raw = yaml.safe_load(template.read_text())
        if self.config.online_store == "redis":
            raw["online_store"]["connection_string"] = self.config.redis_address
        text = (f"# Written by features/sequences.py from features/{template.name}; edit that.\n"
                + yaml.safe_dump(raw, sort_keys=False))
        yaml_path = self.repo_dir / "feature_store.yaml"
        if not yaml_path.exists() or yaml_path.read_text() != text:
            tmp = yaml_path.with_suffix(".yaml.tmp")
            tmp.write_text(text)
            os.replace(tmp, yaml_path)
        return yaml_path

    def _check_redis(self) -> None:
        # Feast connects lazily, on the first read or write; fail here, with the fix, instead.
        host, _, port = self.config.redis_address.rpartition(":")
        client = redis.Redis(host=host, port=int(port), socket_connect_timeout=5)
        try:
            client.ping()
        except redis.exceptions.RedisError as error:
            raise SequenceStoreError(
                f"Redis at {self.config.redis_address} is not reachable ({error}): start it "
                f"(redis-server --port {port}), set redis_address to a running server, or use "
                "online_store='sqlite'"
            ) from error
        finally:
            client.close()

    def _apply_error(self, error: Exception) -> SequenceStoreError:
        return SequenceStoreError(
            f"could not apply the Feast repository in {self.repo_dir} "
            f"({self.config.online_store} online store): {error!r}. Check that the folder is "
            "writable and not a copy from another Feast version (HSTU_STATE_DIR moves it)."
        )

    def write_many(self, batch: SequenceBatch) -> None:
        """Store every user's sequence and watermark in one batched write, replacing old rows."""
        if not isinstance(batch, SequenceBatch):
            raise SequenceBatchError(
                f"write_many takes a SequenceBatch, got {type(batch).__name__}: build one with "
                "SequenceBatch.from_sequences"
            )
        if len(batch) == 0:
            return
        lengths = batch.lengths
        too_long = np.flatnonzero(lengths > self.config.max_len)
        if len(too_long):
            i = int(too_long[0])
            raise SequenceBatchError(
                f"user {int(batch.user_ids[i])} has {int(lengths[i])} events, more than max_len "
                f"({self.config.max_len}): keep the latest max_len events, or raise max_len"
            )
        unique, counts = np.unique(batch.user_ids, return_counts=True)
        if len(unique) != len(batch):
            raise SequenceBatchError(
                f"user {int(unique[counts > 1][0])} appears {int(counts[counts > 1][0])} times in "
                "one write: which row wins would be undefined; merge them first"
            )
        store, view = self._open()
        if self._bulk is not None:
            self._bulk.write(batch, datetime.now(timezone.utc))
            return
        rows = _encode_rows(batch, datetime.now(timezone.utc))
        store.provider.online_write_batch(store.config, view, rows, progress=None)

    def read_many(self, user_ids: np.ndarray) -> SequenceBatch:
        """The stored sequences of `user_ids` (1-D int64), in that order; missing users are empty
        with watermark (-1, -1)."""
        if not isinstance(user_ids, np.ndarray) or user_ids.dtype != np.int64 or user_ids.ndim != 1:
            got = (f"dtype {user_ids.dtype}, shape {user_ids.shape}"
                   if isinstance(user_ids, np.ndarray) else type(user_ids).__name__)
            raise SequenceBatchError(
                f"read_many takes a 1-D int64 numpy array of user ids, got {got}: "
                "use np.asarray(ids, dtype=np.int64)"
            )
        store, view = self._open()
        if self._bulk is not None:
            from features.online_rows import RowLayoutError

            try:
                return self._bulk.read(user_ids, _READ_CHUNK)
            except RowLayoutError as error:  # rows written by something else: Feast's parser
                log.warning("bulk read fell back to Feast's online_read: %s", error)
        results = []
        for start in range(0, len(user_ids), _READ_CHUNK):
            chunk = user_ids[start:start + _READ_CHUNK].tolist()
            keys = [_entity_key(user_id) for user_id in chunk]
            results.extend(store.provider.online_read(store.config, view, keys, list(FEATURES)))
        return _decode_rows(user_ids, results)

    def close(self) -> None:
        """Drop the FeatureStore; its connections close when it is collected. A later call
        reopens it (and applies again, which changes nothing)."""
        self._opened = None
        if self._bulk is not None:
            self._bulk.close()
            self._bulk = None


def _entity_key(user_id: int) -> EntityKeyProto:
    # Filling a fresh message is faster than nested constructor arguments (10k keys per call).
    key = EntityKeyProto()
    key.join_keys.append(USER_ID)
    key.entity_values.add().int64_val = user_id
    return key


def _int64_list(values: np.ndarray) -> ValueProto:
    # extend() from an int64 array slice is the fastest exact path into protobuf (no floats);
    # SetInParent marks an empty list as a list, which Feast would otherwise read as null.
    value = ValueProto()
    value.int64_list_val.SetInParent()
    value.int64_list_val.val.extend(values)
    return value


def _encode_rows(batch: SequenceBatch, now: datetime) -> list:
    """Feast's (entity key, {feature: value}, event time, created time) rows for the batch."""
    offsets = batch.offsets.tolist()
    partitions, last_offsets = batch.last_partition.tolist(), batch.last_offset.tolist()
    rows = []
    for i, user_id in enumerate(batch.user_ids.tolist()):
        start, end = offsets[i], offsets[i + 1]
        values = {
            "item_ids": _int64_list(batch.item_ids[start:end]),
            "actions": _int64_list(batch.actions[start:end]),
            "timestamps": _int64_list(batch.timestamps[start:end]),
            "last_partition": ValueProto(int64_val=partitions[i]),
            "last_offset": ValueProto(int64_val=last_offsets[i]),
        }
        rows.append((_entity_key(user_id), values, now, None))
    return rows


def _decode_rows(user_ids: np.ndarray, results: list) -> SequenceBatch:
    """Turn the provider's per-key (event time, {feature: value} or None) into a batch."""
    num_users = len(user_ids)
    lengths = np.zeros(num_users, dtype=np.int64)
    last_partition = np.full(num_users, -1, dtype=np.int64)
    last_offset = np.full(num_users, -1, dtype=np.int64)
    columns: dict[str, list[np.ndarray]] = {"item_ids": [], "actions": [], "timestamps": []}
    for i, (_, values) in enumerate(results):
        # SQLite gives no dict for a missing user; Redis gives one of unset values. We always
        # write every feature with its oneof set, so "nothing set" is the one missing state.
        present = [name for name in FEATURES
                   if values and name in values and values[name].WhichOneof("val") is not None]
        if not present:
            continue
        missing = [name for name in FEATURES if name not in present]
        if missing:
            raise SequenceStoreError(
                f"user {int(user_ids[i])} has a partial row (no {missing}): it was written "
                "outside SequenceStore; rewrite it with write_many"
            )
        arrays = [np.array(values[name].int64_list_val.val, dtype=np.int64)
                  for name in columns]
        if not len(arrays[0]) == len(arrays[1]) == len(arrays[2]):
            raise SequenceStoreError(
                f"user {int(user_ids[i])} has {[len(a) for a in arrays]} items/actions/timestamps:"
                " the stored row is inconsistent; rewrite it with write_many"
            )
        for name, array in zip(columns, arrays):
            columns[name].append(array)
        lengths[i] = len(arrays[0])
        last_partition[i] = values["last_partition"].int64_val
        last_offset[i] = values["last_offset"].int64_val

    def flat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    return SequenceBatch(
        user_ids=user_ids.copy(),
        offsets=np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)]),
        item_ids=flat(columns["item_ids"]),
        actions=flat(columns["actions"]),
        timestamps=flat(columns["timestamps"]),
        last_partition=last_partition,
        last_offset=last_offset,
    )


def synthetic_batch(*, num_users: int, seq_len: int, seed: int = 0) -> SequenceBatch:
    """`num_users` full-length sequences with ids above 2**53 (benchmarks and tests)."""
    rng = np.random.default_rng(seed)
    total = num_users * seq_len
    return SequenceBatch(
        # Odd ids above 2**53: none of them has an exact float64, so any float detour shows.
        user_ids=2**53 + 1 + 2 * 1_000_003 * np.arange(num_users, dtype=np.int64),
        offsets=np.arange(0, total + 1, seq_len, dtype=np.int64),
        item_ids=rng.integers(2**53, 2**63 - 1, size=total, dtype=np.int64),
        actions=rng.integers(0, 5, size=total, dtype=np.int64),
        timestamps=np.sort(rng.integers(1_600_000_000_000, 1_700_000_000_000, size=total)),
        last_partition=rng.integers(0, 8, size=num_users, dtype=np.int64),
        last_offset=rng.integers(0, 2**40, size=num_users, dtype=np.int64),
    )


def measure_batch_io(
    *,
    num_users: int = 10_000,
    seq_len: int = 200,
    repeats: int = 3,
    online_store: Literal["sqlite", "redis"] = "sqlite",
    redis_address: str = "127.0.0.1:6379",
    work_dir: Path | None = None,
) -> list[dict]:
    """Time batched reads and writes of `num_users` full sequences; one dict per figure.

    Each figure is the median of `repeats` calls over all users (after one untimed write that
    creates the rows, so writes are updates, the streaming job's steady state). Also times
    Feast's DataFrame path (`FeatureStore.push`) for comparison, and checks the read-back is
    exact. Runs in a fresh folder under `work_dir` (default: the state folder's `bench/`),
    removed afterwards. For the benchmark scripts:

        for figure in measure_batch_io(num_users=10_000):
            print(json.dumps(figure))
    """
    parent = work_dir if work_dir is not None else state_dir("bench")
    parent.mkdir(parents=True, exist_ok=True)
    batch = synthetic_batch(num_users=num_users, seq_len=seq_len)
    context = {"num_users": num_users, "seq_len": seq_len, "online_store": online_store,
               "repeats": repeats}
    with tempfile.TemporaryDirectory(dir=parent, prefix="feast-io-") as tmp:
        store = SequenceStore(SequenceStoreConfig(
            max_len=seq_len, online_store=online_store, redis_address=redis_address,
            state_dir=Path(tmp)))
        store.write_many(batch)  # applies the repository and creates the rows

        # Wall time is the figure; CPU time of this process rides along because on a shared
        # machine it moves much less with the neighbours' load.
        def timed(name: str, call: Callable[[], T]) -> tuple[list[tuple[float, float]], T]:
            seconds = []
            for repeat in range(repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                result = call()
                seconds.append((time.perf_counter() - start, time.process_time() - cpu_start))
                log.info("%s %d/%d: %d users in %.3f s, %.3f s CPU (%.0f rows/s)", name,
                         repeat + 1, repeats, num_users, *seconds[-1], num_users / seconds[-1][0])
            return seconds, result

        write_s, _ = timed("write", lambda: store.write_many(batch))
        read_s, read_back = timed("read", lambda: store.read_many(batch.user_ids))
        if not read_back.equals(batch):
            raise SequenceStoreError("read-back differs from what was written: not exact")
        push_s, _ = timed("push", lambda: store.feature_store.push(
            USER_SEQUENCE_PUSH, batch.to_pandas(event_timestamp=datetime.now(timezone.utc))))
        if not store.read_many(batch.user_ids).equals(batch):
            raise SequenceStoreError("read-back after push differs from what was pushed")
        store.close()

    def figure(metric: str, seconds: list[tuple[float, float]], path: str) -> dict:
        median = statistics.median(wall for wall, _ in seconds)
        return {"metric": metric, "value": round(num_users / median, 1), "unit": "rows/s",
                "seconds_median": round(median, 4),
                "seconds_all": [round(wall, 4) for wall, _ in seconds],
                "cpu_seconds_median": round(statistics.median(cpu for _, cpu in seconds), 4),
                "path": path, **context}

    bulk = "features.online_rows (bulk_io)"
    return [
        figure("feast_write_rows_per_s", write_s, bulk if store.config.bulk_io else "provider.online_write_batch"),
        figure("feast_read_rows_per_s", read_s, bulk if store.config.bulk_io else "provider.online_read"),
        figure("feast_push_write_rows_per_s", push_s, "FeatureStore.push (DataFrame)"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m features.sequences [--users N] [--seq-len L] [--online-store redis]`."""
    import json

    parser = argparse.ArgumentParser(description="Time batched Feast reads and writes of "
                                     "user sequences; prints one JSON line per figure.")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--online-store", choices=sorted(CONFIG_FILES), default="sqlite")
    parser.add_argument("--redis-address", default="127.0.0.1:6379")
    args = parser.parse_args(argv)
    # Our progress lines at INFO; Feast's own chatter (registry refreshes) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    for figure in measure_batch_io(num_users=args.users, seq_len=args.seq_len,
                                   repeats=args.repeats, online_store=args.online_store,
                                   redis_address=args.redis_address):
        print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
