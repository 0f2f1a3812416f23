"""Where each event and candidate of a jagged batch sits in the model's flat token sequence.

HSTU reads a user's events as tokens: one per event in the `items` layout, two
(`item_t, action_t`) in the `interleaved` one, followed by ranking candidates (M-FALCON) that see
the history and themselves. `build_layout` computes every index the model, the loss and the
scoring helpers need, once per batch on the host:

    >>> import torch
    >>> from trainer.layout import build_layout
    >>> lay = build_layout(torch.tensor([0, 2, 3]), interleaved=True)
    >>> lay.item_token.tolist(), lay.action_token.tolist(), lay.offsets.tolist()
    ([0, 2, 4], [1, 3, 5], [0, 4, 6])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class ModelInputError(ValueError):
    """Inputs the model cannot encode (too long, wrong shapes, candidates in the items layout)."""


@dataclass(frozen=True, kw_only=True)
class TokenLayout:
    """Where each event and candidate sits in the flattened token sequence of a batch.

    Built on the host from event offsets; all index tensors are int64 on `device`.
    """

    offsets: Tensor  # [B+1] token offsets
    item_token: Tensor  # [E] token of each event's item
    has_next: Tensor  # [E] bool: the event is followed by another of its sequence
    last_event: Tensor  # [B'] the last event of each non-empty sequence
    nonempty: Tensor  # [B] bool: the sequence has events (the rows of last_event)
    action_token: Tensor | None  # [E] token of each event's action (interleaved only)
    query_token: Tensor  # [E] token whose output retrieves the event after this one
    candidate_token: Tensor  # [C] token of each candidate
    positions: Tensor  # [Ttok] position within the sequence (candidates share the first one's)
    num_candidates: Tensor | None  # [B] (None when there are none)
    max_len: int  # longest token sequence in the batch

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


def build_layout(
    event_offsets: Tensor,
    *,
    interleaved: bool,
    candidate_offsets: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> TokenLayout:
    """The `TokenLayout` of a batch with `event_offsets` [B+1] (and optional candidates [B+1])."""
    event_offsets = event_offsets.to("cpu", torch.int64)
    num_seq = event_offsets.numel() - 1
    ev_len = event_offsets[1:] - event_offsets[:-1]  # (B,)
    per_event = 2 if interleaved else 1
    hist_len = per_event * ev_len  # (B,) tokens of history
    if candidate_offsets is not None:
        candidate_offsets = candidate_offsets.to("cpu", torch.int64)
        if candidate_offsets.numel() != num_seq + 1:
            raise ModelInputError(
                f"candidate_offsets has {candidate_offsets.numel()} entries for {num_seq} sequences (need B+1)"
            )
        n_cand = candidate_offsets[1:] - candidate_offsets[:-1]  # (B,)
    else:
        n_cand = torch.zeros(num_seq, dtype=torch.int64)
    tok_len = hist_len + n_cand
    offsets = torch.zeros(num_seq + 1, dtype=torch.int64)
    torch.cumsum(tok_len, 0, out=offsets[1:])
    seq_of_event = torch.repeat_interleave(torch.arange(num_seq), ev_len)  # (E,)
    pos_of_event = torch.arange(int(event_offsets[-1])) - event_offsets[seq_of_event]
    has_next = pos_of_event < (ev_len[seq_of_event] - 1)
    nonempty = ev_len > 0
    last_event = event_offsets[1:][nonempty] - 1
    item_token = offsets[seq_of_event] + per_event * pos_of_event
    action_token = item_token + 1 if interleaved else None
    query_token = action_token if interleaved else item_token
    seq_of_cand = torch.repeat_interleave(torch.arange(num_seq), n_cand)
    first_cand = offsets[:-1] + hist_len  # (B,)
    cand_rank = torch.arange(int(n_cand.sum())) - (torch.cumsum(n_cand, 0) - n_cand)[seq_of_cand]
    candidate_token = first_cand[seq_of_cand] + cand_rank
    seq_of_token = torch.repeat_interleave(torch.arange(num_seq), tok_len)
    positions = torch.arange(int(offsets[-1])) - offsets[seq_of_token]
    positions = torch.minimum(positions, hist_len[seq_of_token])

    def to(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    return TokenLayout(
        offsets=to(offsets),
        item_token=to(item_token),
        has_next=to(has_next),
        last_event=to(last_event),
        nonempty=to(nonempty),
        action_token=to(action_token),
        query_token=to(query_token),
        candidate_token=to(candidate_token),
        positions=to(positions),
        num_candidates=to(n_cand) if candidate_offsets is not None else None,
        max_len=int(tok_len.max()) if num_seq else 0,
    )
