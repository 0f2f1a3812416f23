"""trainer/embedding_table.py: admission, eviction (lru/lfu/ttl), optimizer reset, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.embedding_table import PAD_ROW, DynamicEmbeddingTable, TableConfig, TableError


def make(**kw) -> DynamicEmbeddingTable:
    kw.setdefault("dim", 4)
    return DynamicEmbeddingTable(config=TableConfig(**kw))


def rows_of(table: DynamicEmbeddingTable, ids: list[int]) -> list[int]:
    return table.lookup(torch.tensor(ids)).tolist()


def test_admission_threshold_and_oov() -> None:
    table = make(capacity=4, admit_threshold=3)
    table.observe([5, 5], now=0.0)
    assert rows_of(table, [5]) == [1] and len(table) == 0  # seen twice: still OOV
    stats = table.observe([5, 6], now=1.0)
    assert stats.admitted == 1 and len(table) == 1
    assert rows_of(table, [5, 6]) == [table.first_item_row, 1]
    assert table.live_ids().tolist() == [5]


def test_hashed_oov_rows_are_deterministic_and_in_range() -> None:
    table = make(capacity=4, num_oov_rows=4, admit_threshold=100)
    ids = torch.arange(1000)
    rows = table.lookup(ids)
    assert rows.min() >= 1 and rows.max() <= 4 and len(set(rows.tolist())) == 4
    assert torch.equal(rows, table.lookup(ids))


def test_lookup_keeps_shape_and_pad_row_is_zero() -> None:
    table = make(capacity=8)
    table.observe(torch.tensor([[3, 4], [5, 3]]), now=0.0)
    rows = table.lookup(torch.tensor([[3, 4], [5, 99]]))
    assert rows.shape == (2, 2) and rows[1, 1].item() == 1
    assert torch.count_nonzero(table(torch.tensor([PAD_ROW]))) == 0


def test_lru_evicts_least_recently_seen() -> None:
    table = make(capacity=3, eviction="lru")
    for t, i in enumerate([1, 2, 3]):
        table.observe([i], now=float(t))
    table.observe([1], now=10.0)
    row_of_2 = rows_of(table, [2])[0]
    stats = table.observe([4], now=11.0)
    assert stats.evicted == 1 and stats.admitted == 1
    assert rows_of(table, [2]) == [1]  # 2 is OOV now
    assert rows_of(table, [4]) == [row_of_2]  # 4 took the freed row
    assert sorted(table.live_ids().tolist()) == [1, 3, 4]


def test_lfu_with_decay() -> None:
    table = make(capacity=2, eviction="lfu", lfu_half_life_s=1.0)
    table.observe([1, 1, 1], now=0.0)
    table.observe([2], now=0.0)
    table.observe([3], now=0.0)  # 2 has the lower count
    assert sorted(table.live_ids().tolist()) == [1, 3]
    table.observe([3, 3], now=10.0)  # 1's count of 3 decays to ~0.003 by t=10
    table.observe([4], now=10.0)
    assert sorted(table.live_ids().tolist()) == [3, 4]


def test_ttl_expires_without_pressure() -> None:
    table = make(capacity=10, eviction="ttl", ttl_s=5.0)
    table.observe([1], now=0.0)
    table.observe([2], now=4.0)
    stats = table.observe([3], now=7.0)
    assert stats.expired == 1 and stats.evicted == 0
    assert sorted(table.live_ids().tolist()) == [2, 3]


def test_batch_ids_are_protected_and_overflow_rejected() -> None:
    table = make(capacity=2)
    table.observe([1, 2], now=0.0)
    stats = table.observe([1, 3], now=1.0)  # 1 is in the batch: 2 must go, not 1
    assert sorted(table.live_ids().tolist()) == [1, 3] and stats.evicted == 1
    stats = table.observe([10, 10, 10, 11, 12, 12], now=2.0)  # 3 new ids, 2 rows: keep the frequent
    assert stats.rejected == 1 and sorted(table.live_ids().tolist()) == [10, 12]


def test_eviction_reinitialises_row_and_zeroes_adam_state() -> None:
    table = make(capacity=2, init_std=0.5)
    table.observe([1, 2], now=0.0)
    opt = torch.optim.Adam(table.parameters(), lr=0.1)
    table.attach_optimizer(opt)
    rows = table.lookup(torch.tensor([1, 2]))
    table(rows).pow(2).sum().backward()
    opt.step()
    row1, row2 = rows.tolist()
    before = table.weight.detach().clone()
    state = opt.state[table.weight]
    assert state["exp_avg"][row1].abs().sum() > 0 and state["exp_avg_sq"][row2].abs().sum() > 0
    table.observe([2], now=1.0)
    table.observe([3], now=2.0)  # evicts 1
    assert rows_of(table, [3]) == [row1]
    assert not torch.equal(table.weight[row1], before[row1])
    assert torch.equal(table.weight[row2], before[row2])
    assert state["exp_avg"][row1].abs().sum() == 0 and state["exp_avg_sq"][row1].abs().sum() == 0
    assert state["exp_avg"][row2].abs().sum() > 0 and state["exp_avg_sq"][row2].abs().sum() > 0


def test_attach_rejects_foreign_optimizer() -> None:
    table = make(capacity=2)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(TableError, match="does not hold this table's weight"):
        table.attach_optimizer(torch.optim.Adam(other.parameters()))


def test_save_load_round_trip_continues_identically(tmp_path: Path) -> None:
    cfg = dict(capacity=5, admit_threshold=2, eviction="lfu", num_oov_rows=3)
    table = make(**cfg)
    rng = np.random.default_rng(0)
    for step in range(20):
        table.observe(rng.integers(0, 12, size=8), now=float(step))
    path = tmp_path / "table.safetensors"
    table.save(path)
    loaded = DynamicEmbeddingTable.load(path)
    assert loaded.config == table.config
    ids = torch.arange(15)
    assert torch.equal(loaded.lookup(ids), table.lookup(ids))
    assert torch.equal(loaded.weight, table.weight)
    assert loaded.counters == table.counters
    for k, v in table.export_vocabulary().items():
        np.testing.assert_array_equal(loaded.export_vocabulary()[k], v)
    batch = rng.integers(0, 30, size=10)
    table.observe(batch, now=30.0)
    loaded.observe(batch, now=30.0)
    assert torch.equal(loaded.weight, table.weight)  # same re-init draws after load
    assert torch.equal(loaded.lookup(torch.arange(30)), table.lookup(torch.arange(30)))


def test_load_rejects_other_capacity() -> None:
    small, big = make(capacity=3), make(capacity=4)
    with pytest.raises((TableError, RuntimeError)):
        big.load_state_dict(small.state_dict())
    with pytest.raises(TableError, match="vocab.keys"):
        big.load_vocab_state(small.vocab_state())


def test_memory_is_bounded_under_unbounded_stream() -> None:
    table = make(capacity=100, sketch_width=1024)

    def footprint() -> int:
        return sum(v.numel() * v.element_size() for v in table.state_dict().values())

    before = footprint()
    rng = np.random.default_rng(1)
    for step in range(200):
        table.observe(rng.integers(0, 2**62, size=500), now=float(step))
    assert footprint() == before
    c = table.counters  # every batch brings 500 new ids for 100 rows: 400 are turned away
    assert len(table) == 100 and (c.admitted, c.evicted, c.rejected) == (200 * 100, 199 * 100, 200 * 400)


def test_identical_streams_give_identical_tables() -> None:
    a, b = make(capacity=7, admit_threshold=2), make(capacity=7, admit_threshold=2)
    rng = np.random.default_rng(2)
    for step in range(30):
        ids = rng.integers(0, 40, size=9)
        a.observe(ids, now=float(step))
        b.observe(ids, now=float(step))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sample_rows_only_live() -> None:
    table = make(capacity=50)
    with pytest.raises(TableError, match="empty table"):
        table.sample_rows(3)
    table.observe([7, 8, 9], now=0.0)
    rows = table.sample_rows(200, generator=torch.Generator().manual_seed(0))
    assert set(rows.tolist()) == set(table.live_rows().tolist())


@pytest.mark.parametrize("bad", [[-1], [2**63 - 1]])
def test_out_of_range_ids_rejected(bad: list[int]) -> None:
    table = make(capacity=2)
    with pytest.raises(TableError, match="out of range"):
        table.lookup(np.array(bad, dtype=np.int64))


def test_float_ids_rejected() -> None:
    with pytest.raises(TableError, match="must be integers"):
        make(capacity=2).observe(np.array([1.5]), now=0.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"table.capacity \(0\) must be >= 1"):
        TableConfig(capacity=0)
