"""The offline (paper-protocol) training loop behind `trainer/offline_train.py`.

Protocol (Zhai et al. 2024, sec. 4.1.1, after SASRec), with a validation split added:

1. Each user's ratings in time order; leave-one-out: the last event is the test target, the
   second-to-last the validation target, everything before is training data.
2. Training sequences are each user's latest `max_seq_len + 1` training events; every position
   predicts the next item through the sampled softmax (every event is new).
3. Every `eval_every` epochs: full ranking over all items on validation (history items
   removed). The epoch with the best validation NDCG@10 is kept (`best.safetensors`) and
   evaluated on test at the end. Test at the last epoch is reported too, for comparison with
   the reference implementation, which reports its last epoch.

The item table holds the whole catalogue (capacity = distinct items, admitted up front), as
the reference implementation's fixed table does; items seen only in validation or test keep
their initial embedding.

    from trainer.offline import OfflineConfig, run_offline
    results = run_offline(OfflineConfig(), out_dir=Path(".state/offline/demo"))
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from config.loader import to_dict
from features.movielens import load_ratings
from trainer.batching import iterate_batches
from trainer.checkpoint import load_into, save_checkpoint
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.evaluate import evaluate_retrieval, metrics_from_ranks, retrieval_ranks
from trainer.losses import GenerativeLoss, LossConfig
from trainer.model import HSTUModel, ModelConfig, build_model
from trainer.registry import Registry
from trainer.splits import EvalSet, LeaveOneOutSplit, leave_one_out, sequences_from_frame
from trainer.step import train_step


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: Literal["ml-100k", "ml-1m-subset"] = "ml-100k"
    min_events: int = 3  # users with fewer events cannot be split and are dropped


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 101
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    seed: int = 42
    eval_every: int = 1
    eval_batch_size: int = 256
    patience: int = 0  # stop after this many evaluations without a better validation NDCG@10 (0: never)
    stochastic_length_alpha: float | None = None
    num_threads: int = 2
    device: str = "auto"  # auto: cuda when available, else cpu
    save_checkpoints: bool = True
    # Diagnostic only, never used to choose the epoch: at every evaluation also rank test, and
    # test from the training events alone; per-user ranks go to diagnostic_ranks.npz.
    diagnostic_test_curve: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} ({getattr(self, name)}) must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr ({self.lr}) must be > 0")
        if self.patience < 0:
            raise ValueError(f"train.patience ({self.patience}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class OfflineConfig:
    """Everything `offline_train.py` needs; shipped as YAML in trainer/configs/."""

    name: str = "hstu"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    table_init_std: float = 0.02


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available: use train.device=cpu")
    return device


def load_split(data: DataConfig, data_dir: Path | None = None) -> LeaveOneOutSplit:
    """MovieLens ratings as leave-one-out sequences; actions are rating - 1 (0..4)."""
    ratings = load_ratings(data.dataset, data_dir)
    seqs = sequences_from_frame(ratings, action_column="rating", action_offset=1)
    return leave_one_out(seqs, min_events=data.min_events)


def catalogue(split: LeaveOneOutSplit) -> np.ndarray:
    return np.unique(np.concatenate([split.test.history.item_ids, split.test.targets]))


def build_for_split(config: OfflineConfig, split: LeaveOneOutSplit, device: torch.device) -> HSTUModel:
    """Model over a table that holds the split's whole catalogue."""
    items = catalogue(split)
    table = DynamicEmbeddingTable(
        config=TableConfig(
            capacity=int(items.size), dim=config.model.dim, init_std=config.table_init_std, seed=config.train.seed
        )
    )
    table.observe(items, now=0.0)
    return build_model(config.model, table=table).to(device)


def train_epoch(
    model: HSTUModel,
    split: LeaveOneOutSplit,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: GenerativeLoss,
    config: OfflineConfig,
    rng: np.random.Generator,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """One pass over the training users; returns mean loss, seconds and tokens/s."""
    device = model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses: list[torch.Tensor] = []
    tokens = 0
    steps = 0
    sync()
    start = time.perf_counter()
    for batch in iterate_batches(
        split.train,
        batch_size=config.train.batch_size,
        max_len=config.model.max_seq_len + 1,
        shuffle=True,
        rng=rng,
        stochastic_length_alpha=config.train.stochastic_length_alpha,
        min_length=2,
    ):
        result = train_step(model, batch, optimizer=optimizer, loss_fn=loss_fn)
        losses.append(result.loss)
        tokens += result.tokens
        steps += 1
        if bar is not None:
            bar.update(1)
    mean_loss = torch.stack(losses).mean().item() if losses else math.nan
    sync()
    seconds = time.perf_counter() - start
    return {"loss": mean_loss, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "steps": steps}


def diagnostic_test_ranks(model: HSTUModel, split: LeaveOneOutSplit, config: OfflineConfig) -> dict[str, np.ndarray]:
    """Per-user test ranks now, two ways; a diagnostic that never chooses the epoch.

    test: the protocol's test, ranked from the training events plus the validation event.
    test_without_valid: the same test target ranked from the training events alone (the context
    validation is ranked from); the validation item stays out of the ranking, as in test.
    """
    kwargs = {"max_seq_len": config.model.max_seq_len, "batch_size": config.train.eval_batch_size}
    without_valid = EvalSet(
        history=split.valid.history,
        targets=split.test.targets,
        target_actions=split.test.target_actions,
        target_timestamps_ms=split.test.target_timestamps_ms,
    )
    return {
        "test": retrieval_ranks(model, split.test, **kwargs),
        "test_without_valid": retrieval_ranks(model, without_valid, exclude=split.test.history, **kwargs),
    }


def run_offline(
    config: OfflineConfig,
    *,
    out_dir: Path,
    data_dir: Path | None = None,
    progress: bool = True,
    split: LeaveOneOutSplit | None = None,
    publish: Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate with the paper's protocol; writes metrics.json, curves.png, checkpoints.

    publish: a model registry folder (trainer/registry.py); the model of the epoch chosen on
    validation is published there as a new version, with its test metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.train.num_threads)
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    if split is None:
        split = load_split(config.data, data_dir)
    model = build_for_split(config, split, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, betas=config.train.betas, weight_decay=config.train.weight_decay
    )
    model.table.attach_optimizer(optimizer)
    loss_fn = GenerativeLoss(config=config.loss, table=model.table, seed=config.train.seed)
    rng = np.random.default_rng(config.train.seed)
    steps_per_epoch = math.ceil(int((split.train.lengths >= 2).sum()) / config.train.batch_size)
    log(
        f"[{config.name}] {config.data.dataset}: {len(split.train)} users, {len(model.table)} items, "
        f"{int(split.train.lengths.sum())} training events, {steps_per_epoch} steps/epoch, device {device}, "
        f"{config.train.num_threads} threads, {sum(p.numel() for p in model.parameters())} parameters"
    )
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "valid": None}
    evals_since_best = 0
    best_path = out_dir / "best.safetensors"
    diagnostic_ranks: dict[str, list[Any]] = {"epoch": [], "valid": [], "test": [], "test_without_valid": []}
    (out_dir / "diagnostic_ranks.npz").unlink(missing_ok=True)  # never leave an earlier run's beside this one
    bar = tqdm(
        total=config.train.epochs * steps_per_epoch,
        desc=config.name,
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )
    for epoch in range(1, config.train.epochs + 1):
        stats = train_epoch(model, split, optimizer=optimizer, loss_fn=loss_fn, config=config, rng=rng, bar=bar)
        record: dict[str, Any] = {"epoch": epoch, **stats}
        line = (
            f"[{config.name}] epoch {epoch} loss {stats['loss']:.4f} train {stats['seconds']:.2f}s "
            f"({stats['tokens_per_s']:.0f} tok/s)"
        )
        if epoch % config.train.eval_every == 0 or epoch == config.train.epochs:
            t0 = time.perf_counter()
            valid_ranks = retrieval_ranks(
                model, split.valid, max_seq_len=config.model.max_seq_len, batch_size=config.train.eval_batch_size
            )
            valid = metrics_from_ranks(valid_ranks)
            record["valid"] = valid
            record["eval_seconds"] = time.perf_counter() - t0
            line += f" valid ndcg@10 {valid['ndcg@10']:.4f} hr@10 {valid['hr@10']:.4f}"
            if best["valid"] is None or valid["ndcg@10"] > best["valid"]["ndcg@10"]:
                best = {"epoch": epoch, "valid": valid, "valid_ranks": valid_ranks}
                evals_since_best = 0
                save_checkpoint(best_path, model=model, progress={"epoch": epoch, "valid": valid})
                line += " *"
            else:
                evals_since_best += 1
            if config.train.diagnostic_test_curve:
                diagnostic_ranks["epoch"].append(epoch)
                diagnostic_ranks["valid"].append(valid_ranks)
                for name, ranks_now in diagnostic_test_ranks(model, split, config).items():
                    diagnostic_ranks[name].append(ranks_now)
                    record[f"diagnostic_{name}"] = metrics_from_ranks(ranks_now)
                np.savez_compressed(
                    out_dir / "diagnostic_ranks.npz", **{k: np.asarray(v) for k, v in diagnostic_ranks.items()}
                )
            bar.set_postfix(loss=f"{stats['loss']:.3f}", ndcg10=f"{valid['ndcg@10']:.4f}")
        history.append(record)
        # Progress on disk after every epoch, so an interrupted run still leaves its curves.
        partial = {"name": config.name, "dataset": config.data.dataset, "complete": False, "best_epoch": best["epoch"]}
        (out_dir / "metrics.json").write_text(json.dumps({**partial, "best_valid": best["valid"], "epochs": history}))
        if progress:
            bar.write(line, file=sys.stderr)
        else:
            log(line)
        if config.train.patience and evals_since_best >= config.train.patience:
            log(f"[{config.name}] no better validation NDCG@10 in {evals_since_best} evaluations: stopping")
            break
    bar.close()
    test_last = evaluate_retrieval(
        model, split.test, max_seq_len=config.model.max_seq_len, batch_size=config.train.eval_batch_size
    )
    last_epoch = history[-1]["epoch"]
    if config.train.save_checkpoints:
        save_checkpoint(out_dir / "last.safetensors", model=model, optimizer=optimizer, progress={"epoch": last_epoch})
    load_into(best_path, model=model)
    # Per-user ranks at the chosen epoch, so a comparison of two runs can resample the users.
    ranks = {
        "valid": best["valid_ranks"],
        "test": retrieval_ranks(
            model, split.test, max_seq_len=config.model.max_seq_len, batch_size=config.train.eval_batch_size
        ),
    }
    test = metrics_from_ranks(ranks["test"])
    if publish is not None:
        manifest = Registry(publish).publish(
            model,
            metrics={"test": test, "best_valid": best["valid"], "best_epoch": best["epoch"]},
            info={"trainer": "offline", "name": config.name, "dataset": config.data.dataset},
        )
        log(f"[{config.name}] published version {manifest.version} to {publish}")
    if not config.train.save_checkpoints:
        best_path.unlink(missing_ok=True)
    train_seconds = [h["seconds"] for h in history]
    results = {
        "name": config.name,
        "dataset": config.data.dataset,
        "complete": True,
        "config": to_dict(config),
        "device": str(device),
        "threads": config.train.num_threads,
        "best_epoch": best["epoch"],
        "best_valid": best["valid"],
        "test": test,
        "last_epoch": last_epoch,
        "test_last_epoch": test_last,
        "ranks_at_best_epoch": {name: r.tolist() for name, r in ranks.items()},
        "seconds_per_epoch_median": statistics.median(train_seconds),
        "seconds_per_epoch_mean": statistics.fmean(train_seconds),
        "tokens_per_s_median": statistics.median(h["tokens_per_s"] for h in history),
        "steps_per_epoch": history[0]["steps"],
        "epochs": history,
    }
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    plot_curves(history, out_dir / "curves.png", title=f"{config.name} on {config.data.dataset}")
    log(
        f"[{config.name}] best epoch {best['epoch']} valid ndcg@10 {best['valid']['ndcg@10']:.4f}; "
        f"test ndcg@10 {test['ndcg@10']:.4f} hr@10 {test['hr@10']:.4f}; "
        f"median {results['seconds_per_epoch_median']:.2f} s/epoch; wrote {out_dir}"
    )
    return results


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Training loss and validation NDCG@10 / HR@10 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["loss"] for h in history])
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    evaluated = [h for h in history if "valid" in h]
    for key in ("ndcg@10", "hr@10"):
        ax_metric.plot([h["epoch"] for h in evaluated], [h["valid"][key] for h in evaluated], marker=".", label=key)
    ax_metric.set(xlabel="epoch", title="validation")
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
