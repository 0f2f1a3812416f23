"""Read and write many users' rolling sequences in one call, through Feast's online store.

The streaming job reads the sequences of every user in a micro-batch, appends the new events and
writes them back; serving reads them to rank. Both go through `SequenceStore`, which applies the
Feast repository (`features/definitions.py`, `features/feature_store*.yaml`) on first use and
then writes and reads the online store's rows in bulk (features/online_rows.py: the bytes
Feast's provider would write, built and parsed with numpy, one `executemany` or Redis pipeline
per call). `bulk_io=False` goes through the provider instead: one `online_read` and one
`online_write_batch` per call, with one protobuf message per value built here. Feast's DataFrame
path (`FeatureStore.write_to_online_store` / `push`) and `get_online_features` are slower for
the same rows (benchmarks/ingest_io.py times the write paths).

Sequences travel as the one jagged type, `features.sequence_batch.SequenceBatch`. A user with no
stored row comes back with an empty sequence and the watermark (`last_partition`,
`last_offset`) = (-1, -1).

    >>> import numpy as np
    >>> from features.sequence_batch import SequenceBatch
    >>> from features.sequences import SequenceStore, SequenceStoreConfig
    >>> store = SequenceStore(SequenceStoreConfig(max_len=200))      # SQLite under .state/feast/
    >>> store.write_many(SequenceBatch.from_sequences(
    ...     user_ids=[2**60 + 1], item_ids=[[2**62 + 3, 7]], actions=[[4, 0]],
    ...     timestamps_ms=[[1_700_000_000_000, 1_700_000_000_500]],
    ...     last_partition=[2], last_offset=[41]))
    >>> batch = store.read_many(np.array([2**60 + 1, 5], dtype=np.int64))
    >>> batch.sequence(0).item_ids.tolist(), batch.sequence(1).last_offset
    ([4611686018427387907, 7], -1)

`online_store="redis"` uses `features/feature_store.redis.yaml` against `redis_address`.
Write semantics are last-write-wins per user on both stores; ordering writes (by watermark) is
the caller's job.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import redis
import yaml
from feast import FeatureStore, FeatureView
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from config.paths import state_dir
from features import online_rows, redis_security
from features.definitions import FEATURES, SEQUENCE_FEATURES, USER_ID, USER_SEQUENCE, feast_objects
from features.online_rows import RowLayoutError, SequenceStoreError
from features.redis_pipe import RedisPipe
from features.redis_security import RedisSecurityConfig, RedisSecurityError
from features.sequence_batch import SequenceBatch, SequenceBatchError

log = logging.getLogger(__name__)

FEATURES_DIR = Path(__file__).resolve().parent
CONFIG_FILES = {"sqlite": "feature_store.yaml", "redis": "feature_store.redis.yaml"}
# Feast's SQLite read binds one parameter per key in one IN (...) query, and SQLite (>= 3.32)
# allows 32766 per statement; 10k keys per query keeps the common batch size to one query.
_READ_CHUNK = 10_000


@dataclass(frozen=True, kw_only=True)
class SequenceStoreConfig:
    """Where the sequences live and how long they may be.

    max_len: the longest sequence `write_many` accepts (the streaming job's rolling window).
    online_store: "sqlite" (default, a file under the state folder) or "redis".
    redis_address: "host:port" of the Redis server when online_store is "redis".
    redis_security: its password (from an environment variable or a file) and TLS
      (features/redis_security.py); none by default.
    state_dir: the folder that holds the Feast repository (registry, SQLite file, offline
      files); None means `config.paths.state_dir("feast")`. Each online store gets a subfolder.
    bulk_io: write and read the rows with features/online_rows.py (the same bytes, built and
      parsed with numpy: 2-4x faster on the 2-core box, see benchmarks/RESULTS.md); False goes
      through the provider's `online_write_batch` / `online_read`, one protobuf message per value.
    """

    max_len: int
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_address: str = "127.0.0.1:6379"
    state_dir: Path | None = None
    bulk_io: bool = True
    redis_security: RedisSecurityConfig = field(default_factory=RedisSecurityConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1:
            raise ValueError(f"max_len ({self.max_len!r}) must be a positive int")
        if self.online_store not in CONFIG_FILES:
            raise ValueError(f"online_store ({self.online_store!r}) must be one of {sorted(CONFIG_FILES)}")
        host, sep, port = self.redis_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"redis_address ({self.redis_address!r}) must be 'host:port', e.g. '127.0.0.1:6379'")
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
            if self.config.online_store == "redis":
                self._give_feast_a_client(store)
            try:
                store.apply(feast_objects().all())
            except (OSError, ValueError, sqlite3.Error) as error:
                raise self._apply_error(error) from error
            self._opened = (store, store.get_feature_view(USER_SEQUENCE))
            if self.config.bulk_io:
                try:
                    self._bulk = self._open_bulk(*self._opened)
                except RowLayoutError as error:  # a table layout we do not write: the provider's path
                    log.warning("bulk I/O off, using Feast's provider: %s", error)
        log.info("feast repository applied in %s (%s online store)", self.repo_dir, self.config.online_store)
        return self._opened

    def _open_bulk(self, store: FeatureStore, view: FeatureView):
        """The bulk row writer/reader for this store (features/online_rows.py)."""
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id
        from google.protobuf.timestamp_pb2 import Timestamp

        version = store.config.entity_key_serialization_version

        def serialize_one(user_id: int) -> bytes:
            return serialize_entity_key(_entity_key(user_id), entity_key_serialization_version=version)

        if self.config.online_store == "sqlite":
            table = _table_id(store.config.project, view, store.config.registry.enable_online_feature_view_versioning)
            return online_rows.SqliteRows(SqliteOnlineStore._get_db_path(store.config), table, serialize_one)

        def timestamp_bytes(now: datetime) -> bytes:
            ts = Timestamp()
            ts.FromDatetime(now)
            return ts.SerializeToString()

        host, _, port = self.config.redis_address.rpartition(":")
        security = self.config.redis_security
        pipe = RedisPipe(
            host,
            int(port),
            tls=redis_security.ssl_context(security),
            auth=lambda: redis_security.auth_command(security),
        )
        return online_rows.RedisRows(pipe, store.config.project, view.name, serialize_one, _mmh3, timestamp_bytes)

    def _redis_client(self) -> redis.Redis:
        host, _, port = self.config.redis_address.rpartition(":")
        return redis.Redis(
            host=host,
            port=int(port),
            socket_connect_timeout=5,
            **redis_security.redis_kwargs(self.config.redis_security),
        )

    def _give_feast_a_client(self, store: FeatureStore) -> None:
        """Feast's Redis store builds its client from `connection_string`, which would have to hold
        the password (in the repository's YAML, in Feast's config object); hand it a client built
        here instead, with the password read from where the config says."""
        if not self.config.redis_security.auth:
            return
        online = store._get_provider().online_store
        if not hasattr(online, "_client"):  # pragma: no cover - Feast is pinned (<0.68)
            raise SequenceStoreError(
                f"this Feast version's Redis store ({type(online).__name__}) takes no client: a Redis "
                "password cannot be passed without writing it into its config"
            )
        online._client = self._redis_client()

    def _write_repo_config(self) -> Path:
        """Copy features/feature_store*.yaml into repo_dir (with redis_address); return its path."""
        template = FEATURES_DIR / CONFIG_FILES[self.config.online_store]
        raw = yaml.safe_load(template.read_text())
        if self.config.online_store == "redis":
            raw["online_store"]["connection_string"] = (
                self.config.redis_address + redis_security.feast_connection_params(self.config.redis_security)
            )
        text = f"# Written by features/sequences.py from features/{template.name}; edit that.\n" + yaml.safe_dump(
            raw, sort_keys=False
        )
        yaml_path = self.repo_dir / "feature_store.yaml"
        if not yaml_path.exists() or yaml_path.read_text() != text:
            tmp = yaml_path.with_suffix(".yaml.tmp")
            tmp.write_text(text)
            os.replace(tmp, yaml_path)
        return yaml_path

    def _check_redis(self) -> None:
        # Feast connects lazily, on the first read or write; fail here, with the fix, instead.
        _, _, port = self.config.redis_address.rpartition(":")
        security = self.config.redis_security
        client = self._redis_client()
        try:
            client.ping()
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as error:
            fix = (
                f"check the password in {redis_security.describe(security)}"
                if security.auth
                else "set feast.redis_security.password_env (e.g. HSTU_REDIS_PASSWORD) or password_file"
            )
            raise RedisSecurityError(
                f"authentication failed: Redis at {self.config.redis_address} refused the connection ({error}): {fix}"
            ) from None
        except redis.exceptions.ResponseError as error:
            if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
                raise RedisSecurityError(
                    f"authentication failed: Redis at {self.config.redis_address} ({error}): set "
                    "feast.redis_security.password_env or password_file"
                ) from None
            raise SequenceStoreError(f"Redis at {self.config.redis_address}: {error}") from error
        except redis.exceptions.RedisError as error:
            if isinstance(error.__cause__ or error.__context__, ssl.SSLCertVerificationError) or "certificate" in str(
                error
            ):
                raise RedisSecurityError(
                    f"TLS to Redis at {self.config.redis_address} failed ({error}): set "
                    "feast.redis_security.ca_file to the CA that signed its certificate"
                ) from None
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
            self._bulk.write(batch, datetime.now(UTC))
            return
        rows = _encode_rows(batch, datetime.now(UTC))
        store.provider.online_write_batch(store.config, view, rows, progress=None)

    def read_many(self, user_ids: np.ndarray) -> SequenceBatch:
        """The stored sequences of `user_ids` (1-D int64), in that order; missing users are empty
        with watermark (-1, -1)."""
        if not isinstance(user_ids, np.ndarray) or user_ids.dtype != np.int64 or user_ids.ndim != 1:
            got = (
                f"dtype {user_ids.dtype}, shape {user_ids.shape}"
                if isinstance(user_ids, np.ndarray)
                else type(user_ids).__name__
            )
            raise SequenceBatchError(
                f"read_many takes a 1-D int64 numpy array of user ids, got {got}: use np.asarray(ids, dtype=np.int64)"
            )
        store, view = self._open()
        if self._bulk is not None:
            try:
                return self._bulk.read(user_ids, _READ_CHUNK)
            except RowLayoutError as error:  # rows written by something else: Feast's parser
                log.warning("bulk read fell back to Feast's online_read: %s", error)
        results = []
        for start in range(0, len(user_ids), _READ_CHUNK):
            chunk = user_ids[start : start + _READ_CHUNK].tolist()
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
            **{name: _int64_list(getattr(batch, name)[start:end]) for name in SEQUENCE_FEATURES},
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
    columns: dict[str, list[np.ndarray]] = {name: [] for name in SEQUENCE_FEATURES}
    for i, (_, values) in enumerate(results):
        # SQLite gives no dict for a missing user; Redis gives one of unset values. We always
        # write every feature with its oneof set, so "nothing set" is the one missing state.
        present = [
            name for name in FEATURES if values and name in values and values[name].WhichOneof("val") is not None
        ]
        if not present:
            continue
        missing = [name for name in FEATURES if name not in present]
        if missing:
            raise SequenceStoreError(
                f"user {int(user_ids[i])} has a partial row (no {missing}): it was written "
                "outside SequenceStore; rewrite it with write_many"
            )
        arrays = [np.array(values[name].int64_list_val.val, dtype=np.int64) for name in columns]
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
        **{name: flat(columns[name]) for name in SEQUENCE_FEATURES},
        last_partition=last_partition,
        last_offset=last_offset,
    )
