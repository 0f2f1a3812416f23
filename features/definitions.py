"""The Feast objects of the project: the `user` entity, the `user_sequence` feature view and the
push source that feeds it.

A user's rolling sequence (DESIGN.md) is one online row keyed by `user_id` (int64):

| feature | type | meaning |
| --- | --- | --- |
| `item_ids` | Array(Int64) | raw item ids, oldest first, at most `max_len` |
| `actions` | Array(Int64) | action codes: indices into the configured action vocabulary |
| `timestamps_ms` | Array(Int64) | event times in ms since the epoch |
| `last_partition` | Int64 | Kafka partition of the last applied event (-1: none yet) |
| `last_offset` | Int64 | Kafka offset of the last applied event (-1: none yet) |

Actions are stored as int64 codes rather than strings: Feast's online stores keep one protobuf
value per feature, and a code array is smaller and decodes straight into the model's input.
The action vocabulary (owned by `streaming/`) maps codes back to names.

The push source `user_sequence_push` is how other producers write rows through Feast's own API
(`FeatureStore.push`); its batch source is a Parquet file under the repository folder, the file
offline store's home for offline copies. `features.sequences.SequenceStore` applies these
objects on first use, so nobody needs to run `feast apply`:

    >>> from features.definitions import feast_objects
    >>> objects = feast_objects()
    >>> objects.user_sequence.name, [f.name for f in objects.user_sequence.features]
    ('user_sequence', ['item_ids', 'actions', 'timestamps_ms', 'last_partition', 'last_offset'])
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Int64

USER_ENTITY = "user"
USER_ID = "user_id"
USER_SEQUENCE = "user_sequence"
USER_SEQUENCE_PUSH = "user_sequence_push"
EVENT_TIMESTAMP = "event_timestamp"
# Relative to the Feast repo_path (the state folder), like every path in feature_store.yaml.
OFFLINE_PATH = "offline/user_sequence.parquet"

# Feature names are the field names of features.sequence_batch.SequenceBatch.
SEQUENCE_FEATURES = ("item_ids", "actions", "timestamps_ms")
WATERMARK_FEATURES = ("last_partition", "last_offset")
FEATURES = SEQUENCE_FEATURES + WATERMARK_FEATURES


@dataclass(frozen=True, kw_only=True)
class FeastObjects:
    """Fresh Feast objects for one `FeatureStore.apply` (Feast mutates what it applies)."""

    user: Entity
    batch_source: FileSource
    push_source: PushSource
    user_sequence: FeatureView

    def all(self) -> list:
        """The objects in the order `FeatureStore.apply` takes them."""
        return [self.user, self.batch_source, self.push_source, self.user_sequence]


def feast_objects() -> FeastObjects:
    """Build the repository's entity, sources and feature view."""
    user = Entity(
        name=USER_ENTITY,
        join_keys=[USER_ID],
        value_type=ValueType.INT64,
        description="A user who engages with items; the Kafka key of their events.",
    )
    batch_source = FileSource(
        name="user_sequence_offline",
        path=OFFLINE_PATH,
        timestamp_field=EVENT_TIMESTAMP,
        description="Offline copies of rolling sequences, as of the time they were written.",
    )
    push_source = PushSource(
        name=USER_SEQUENCE_PUSH,
        batch_source=batch_source,
        description="Updated rolling sequences pushed by the streaming job.",
    )
    user_sequence = FeatureView(
        name=USER_SEQUENCE,
        entities=[user],
        # 0 = rows never expire: a sequence leaves the store only when the user is removed.
        ttl=timedelta(0),
        source=push_source,
        schema=[
            Field(name=USER_ID, dtype=Int64),
            *(Field(name=name, dtype=Array(Int64)) for name in SEQUENCE_FEATURES),
            *(Field(name=name, dtype=Int64) for name in WATERMARK_FEATURES),
        ],
        online=True,
        description=(
            "A user's rolling sequence of their latest events, oldest first, and the "
            "(partition, offset) watermark of the last event applied to it."
        ),
    )
    return FeastObjects(user=user, batch_source=batch_source, push_source=push_source, user_sequence=user_sequence)
