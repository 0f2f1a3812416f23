"""The HTTP contract: request bodies (validated strictly) and responses (documented at `/docs`).

Requests are strict: a field of the wrong JSON type (`"5"` for an id, `5.0` for an int), an
unknown field, a negative or out-of-range id is a 422 that names the field. Limits that come
from the replica's config (`limits.max_candidates`, ...) are checked by the app after parsing,
also with a 422 that names the limit; bodies past `limits.max_body_bytes` get a 413 before they
are read.

    >>> from serving.schemas import RankRequest
    >>> RankRequest.model_validate_json('{"user_id": 7, "candidates": [3, 5], "top_k": 1}').top_k
    1
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INT64_MAX = 2**63 - 1
ITEM_ID_MAX = 2**63 - 2  # the embedding table keeps 2**63 - 1 as its empty-slot sentinel
TS_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

UserId = Annotated[int, Field(ge=0, le=INT64_MAX, description="int64 user id, >= 0")]
ItemId = Annotated[int, Field(ge=0, le=ITEM_ID_MAX, description="int64 item id in [0, 2**63 - 2]")]
TimeMs = Annotated[int, Field(ge=0, le=TS_MS_MAX, description="milliseconds since the epoch")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Event(_Strict):
    """An engagement the client knows of that may not be in the feature store yet."""

    item_id: ItemId
    action: int | str = Field(description="the action's name (e.g. 'rate_4') or its code (0-based)")
    ts_ms: TimeMs


class RankRequest(_Strict):
    user_id: UserId
    candidates: list[ItemId] = Field(min_length=1, description="item ids to order (limits.max_candidates at most)")
    top_k: int | None = Field(default=None, ge=1, description="return only the best top_k (default: all)")
    recent_events: list[Event] = Field(
        default_factory=list, description="events after the stored sequence, merged into it (duplicates dropped)"
    )
    request_ts_ms: TimeMs | None = Field(
        default=None, description="the time the ranking is for (default: now); candidates are placed at it"
    )


class RetrieveRequest(_Strict):
    user_id: UserId
    k: int = Field(ge=1, description="how many items (limits.max_k at most)")
    exclude_seen: bool = Field(default=True, description="leave out items in the user's history")
    recent_events: list[Event] = Field(default_factory=list)
    request_ts_ms: TimeMs | None = None


class RankedItem(BaseModel):
    item_id: int
    score: float = Field(description="engagement score: sum_a weight[a] * P(a), or popularity on a cold start")
    probabilities: list[float] | None = Field(description="P(action) in the order of `actions`; null on a cold start")
    oov: bool = Field(description="the id has no row in this version's table: it scored through the OOV row")


class RankResponse(BaseModel):
    user_id: int
    version: int = Field(description="the model version that answered")
    cold_start: bool = Field(description="no history: ordered by popularity in the version's vocabulary counts")
    score: str = Field(description="how `score` is defined")
    actions: list[str]
    request_ts_ms: int
    history_events: int = Field(description="events the answer was conditioned on")
    items: list[RankedItem]
    timings_ms: dict[str, float]


class RetrievedItem(BaseModel):
    item_id: int
    score: float = Field(description="cosine of user and item embeddings, or the item's count on a cold start")


class RetrieveResponse(BaseModel):
    user_id: int
    version: int
    cold_start: bool
    request_ts_ms: int
    history_events: int
    items: list[RetrievedItem]
    timings_ms: dict[str, float]


class VersionResponse(BaseModel):
    version: int | None = Field(description="the version answering now (null before any was loaded)")
    created_ms: int | None
    created: str | None = Field(description="manifest time, ISO 8601 UTC")
    offsets: dict[str, int] = Field(description="Kafka partition -> next offset the version has not trained on")
    metrics: dict
    following: int | str = Field(description="'latest', or the pinned version")
    swaps: int = Field(description="versions swapped in since the replica started")
    refused: dict[str, str] = Field(description="versions refused by this replica, with the reason")


class HealthResponse(BaseModel):
    status: str
    version: int | None


class ErrorResponse(BaseModel):
    detail: str | list
