"""Serving figures: `/rank` and `/retrieve` over real HTTP, under closed-loop load from `wrk`.

    .venv/bin/python -m benchmarks.serving                        # the default figures, ~8 min
    .venv/bin/python -m benchmarks.serving --candidates 100 --duration 20 --connections 4

It starts what it needs and stops it again: a model registry and a SQLite Feast store in a
temporary folder, a local Ray with Ray Serve on a free 127.0.0.1 port, the serving app
(serving/app.py, `--replicas` replicas: 2 by default, one per core, serving/config.yaml's
autoscaling maximum; access logs off, as in that file); then drives it with `wrk` (a separate
process, Debian's package: `apt-get install -y wrk`) and a Lua script this module writes.

Workload. The model is trainer/configs/hstu.yaml in the interleaved layout (2 layers, d=50,
max_seq_len 200) over a 100,000-item table (`--catalogue`); its weights are untrained (cost does
not depend on them). `--users` users (1,000) each hold 200 events in Feast. Each request is a
random user; `/rank` asks for `--candidates` random catalogue ids (100 and 1,000), `/retrieve`
for the top `--retrieve-k` (100) of the 100,000 live items. Before measuring, and again after
each run with swaps, every user is requested (`prime`): the replicas' encoded-history caches
start warm, as a serving fleet's would. Each run has a short unmeasured warm-up. "With swaps",
the benchmark process publishes a new version (the same weights, perturbed) to the registry
every `--publish-every` s (10) during the run, and every replica loads, verifies and swaps it
in: each publish invalidates every cached history, so the users after it are encoded again.

Figures (JSON lines {"metric", "value", "unit", "candidates", "swaps", ...context}):
rank_qps, rank_p50_ms, rank_p99_ms, swap_errors (non-2xx and socket errors in a run with swaps),
retrieve_qps, retrieve_p99_ms; the per-stage cost from the replicas' own timings of every
answered request (stage_features_ms: the batch's Feast read; stage_encode_ms: the encode of one
history, over cache misses only, with cache_hit_rate; stage_score_ms: candidate scoring and the
answer's serialisation; stage_queue_ms: waiting for a batch; stage_http_serve_ms: the client's mean
latency minus the replica's, i.e. HTTP, the Serve proxy and the request's routing); and the
model alone, in-process, 1 thread (model_rank_full_ms: `HSTUModel.rank`'s one pass;
model_encode_ms + model_score_cached_ms: the KV-cache form serving uses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from config.loader import load_config
from config.paths import REPO_ROOT
from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.model import HSTUModel, build_model
from trainer.offline import OfflineConfig
from trainer.registry import Registry

WRK_MISSING = "wrk is not installed: apt-get install -y wrk (Debian's package; .ci/run installs it)"
HISTORY_EVENTS = 200
NOW_MS = 1_767_225_600_000  # 2026-01-01: the users' last events are shortly before

LUA = r"""
-- Written by benchmarks/serving.py. wrk ... -s this.lua URL -- PATH USERS CANDIDATES K CATALOGUE
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  path, users, ncand, k, catalogue = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4]), tonumber(args[5])
  math.randomseed(7919 * (id + 1))
  pools = {}
  for p = 1, 32 do
    local ids = {}
    for i = 1, ncand do ids[i] = tostring(math.random(1, catalogue)) end
    pools[p] = "[" .. table.concat(ids, ",") .. "]"
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  ok, bad, vmin, vmax = 0, 0, 1e18, 0
  queue, features, encode, score, replica, misses = 0, 0, 0, 0, 0, 0
end

function request()
  local uid = math.random(0, users - 1)
  local body
  if ncand > 0 then
    body = '{"user_id":' .. uid .. ',"candidates":' .. pools[math.random(1, #pools)] .. '}'
  else
    body = '{"user_id":' .. uid .. ',"k":' .. k .. '}'
  end
  return wrk.format(nil, path, nil, body)
end

local function field(t, name)
  return tonumber(t:match('"' .. name .. '":([%d%.eE%-]+)')) or 0
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    return
  end
  ok = ok + 1
  local v = tonumber(body:match('"version":(%d+)'))
  if v then
    if v < vmin then vmin = v end
    if v > vmax then vmax = v end
  end
  local t = body:match('"timings_ms":(%b{})')
  if t then
    queue = queue + field(t, "queue")
    features = features + field(t, "features")
    local e = field(t, "encode")
    if e > 0 then
      encode = encode + e
      misses = misses + 1
    end
    score = score + field(t, "score")
    replica = replica + field(t, "replica")
  end
end

function done(summary, latency, requests)
  local sums = {ok = 0, bad = 0, queue = 0, features = 0, encode = 0, score = 0, replica = 0, misses = 0}
  local lo, hi = 1e18, 0
  for _, thread in ipairs(threads) do
    for name, _ in pairs(sums) do sums[name] = sums[name] + thread:get(name) end
    lo = math.min(lo, thread:get("vmin"))
    hi = math.max(hi, thread:get("vmax"))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_s": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "mean_ms": %.3f, ' ..
    '"max_ms": %.3f, "ok": %d, "non_2xx": %d, "socket_errors": %d, "timeouts": %d, "version_min": %d, ' ..
    '"version_max": %d, "queue": %.4f, "features": %.4f, "encode": %.4f, "score": %.4f, "replica": %.4f, ' ..
    '"misses": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3, latency.max / 1e3, sums.ok, sums.bad + e.status, e.connect + e.read + e.write,
    e.timeout, lo < 1e18 and lo or 0, hi, sums.queue, sums.features, sums.encode, sums.score, sums.replica,
    sums.misses))
end
"""


def emit(metric: str, value: float, unit: str, **context) -> None:
    print(json.dumps({"metric": metric, "value": round(float(value), 4), "unit": unit, **context}), flush=True)


def say(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine() -> dict:
    return {"cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)}


# ----------------------------------------------------------------------------- the world
def build_bench_model(catalogue: int, seed: int = 0) -> HSTUModel:
    """hstu.yaml, interleaved, over a `catalogue`-item table with Zipf-like counts (popularity)."""
    config = load_config(OfflineConfig, REPO_ROOT / "trainer" / "configs" / "hstu.yaml", ["model.layout=interleaved"])
    torch.manual_seed(seed)
    table = DynamicEmbeddingTable(config=TableConfig(capacity=catalogue, dim=config.model.dim, seed=seed))
    ids = np.arange(1, catalogue + 1, dtype=np.int64)
    table.observe(ids, now=0.0)
    heads = np.random.default_rng(seed).zipf(1.3, size=200_000)
    table.observe(heads[heads <= catalogue].astype(np.int64), now=1.0)
    return build_model(config.model, table=table).eval()


def user_histories(users: int, catalogue: int, seed: int = 0) -> SequenceBatch:
    """`users` users with 200 events each: Zipf-ish items, ratings 0..4, minutes apart, ending before NOW_MS."""
    rng = np.random.default_rng(seed)
    n = users * HISTORY_EVENTS
    items = np.minimum(rng.zipf(1.2, size=n), catalogue).astype(np.int64)
    gaps = rng.integers(10_000, 3_600_000, size=(users, HISTORY_EVENTS))
    ts = NOW_MS - np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]
    return SequenceBatch(
        user_ids=np.arange(users, dtype=np.int64),
        offsets=np.arange(0, n + 1, HISTORY_EVENTS, dtype=np.int64),
        item_ids=items,
        actions=rng.integers(0, 5, size=n).astype(np.int64),
        timestamps_ms=ts.reshape(-1).astype(np.int64),
        last_partition=np.zeros(users, dtype=np.int64),
        last_offset=np.arange(users, dtype=np.int64) * 1000,
    )


class Publisher:
    """Publishes a new version (the same model, weights nudged) every `every_s` seconds."""

    def __init__(self, registry: Registry, model: HSTUModel, every_s: float) -> None:
        self.registry, self.model, self.every_s = registry, model, every_s
        self.published: list[tuple[int, float]] = []  # (version, seconds the publish took)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with torch.no_grad():
                self.model.action_head.bias.add_(1e-3)
            started = time.perf_counter()
            manifest = self.registry.publish(self.model, info={"benchmark": "serving"})
            self.published.append((manifest.version, time.perf_counter() - started))


# ----------------------------------------------------------------------------- load
def run_wrk(
    url: str,
    script: Path,
    *,
    path: str,
    users: int,
    candidates: int,
    k: int,
    catalogue: int,
    connections: int,
    duration: float,
    threads: int,
) -> dict:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{int(duration)}s", "--latency", "--timeout", "30s",
        "-s", str(script), url, "--", path, str(users), str(candidates), str(k), str(catalogue),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line.removeprefix("WRK_RESULT "))
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")


def prime(url: str, users: int, catalogue: int, *, replicas: int) -> None:
    """Request every user, so each replica's cache of encoded histories starts warm: once with
    one replica; with R, 2R times (Serve routes each request to one of them: a replica then
    misses a user with probability 2^-2R)."""

    def one(user_id: int) -> None:
        body = json.dumps({"user_id": user_id, "candidates": [1 + user_id % catalogue]}).encode()
        req = urllib.request.Request(f"{url}/rank", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()

    passes = 1 if replicas == 1 else 2 * replicas
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, [user for _ in range(passes) for user in range(users)]))


def wait_version(url: str, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/version", timeout=30) as response:
            if json.loads(response.read())["version"] == version:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the app did not serve version {version} within {timeout} s")


def report(kind: str, result: dict, **context) -> None:
    answered = max(result["ok"], 1)
    qps = result["requests"] / result["duration_s"]
    emit(f"{kind}_qps", qps, "requests/s", **context)
    if kind == "rank":
        emit("rank_p50_ms", result["p50_ms"], "ms", **context)
    emit(f"{kind}_p99_ms", result["p99_ms"], "ms", **context)
    if context.get("swaps"):
        errors = result["non_2xx"] + result["socket_errors"] + result["timeouts"]
        emit("swap_errors", errors, "responses", endpoint=kind, **context)
    replica = result["replica"] / answered
    emit("stage_features_ms", result["features"] / answered, "ms", endpoint=kind, **context)
    emit(
        "stage_encode_ms", result["encode"] / max(result["misses"], 1), "ms per miss", endpoint=kind,
        cache_hit_rate=round(1 - result["misses"] / answered, 4), **context,
    )  # fmt: skip
    emit("stage_score_ms", result["score"] / answered, "ms", endpoint=kind, **context)
    emit("stage_queue_ms", result["queue"] / answered, "ms", endpoint=kind, **context)
    emit("stage_replica_ms", replica, "ms", endpoint=kind, **context)
    emit("stage_http_serve_ms", result["mean_ms"] - replica, "ms", endpoint=kind, **context)


def model_costs(model: HSTUModel, histories: SequenceBatch, candidate_counts: list[int]) -> None:
    """The model alone, in-process, 1 thread: the full pass against the KV-cache form."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seq = histories.sequence(0)
    ids, actions, ts = (
        torch.from_numpy(a[-model.config.max_seq_len :]) for a in (seq.item_ids, seq.actions, seq.timestamps_ms)
    )
    # The full pass sizes its positions for the candidates it takes: the same model with room for them.
    sized = replace(model.config, max_candidates=max(candidate_counts))
    full_model = build_model(sized, table=model.table).eval()

    def timed(fn, reps: int) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1000 * (time.perf_counter() - started) / reps

    encode = timed(lambda: model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts), 20)
    emit("model_encode_ms", encode, "ms", history_events=len(ids), threads=1, **machine())
    cache = model.encode_history(item_ids=ids, actions=actions, timestamps_ms=ts)
    for count in candidate_counts:
        cands = torch.randint(1, len(model.table), (count,))
        when = torch.full((count,), NOW_MS)
        full = timed(
            lambda c=cands, w=when: full_model.rank(
                item_ids=ids, actions=actions, timestamps_ms=ts, candidate_ids=c, candidate_timestamps_ms=w
            ),
            3,
        )
        cached = timed(
            lambda c=cands, w=when: model.score_candidates(cache, candidate_ids=c, candidate_timestamps_ms=w), 20
        )
        emit("model_rank_full_ms", full, "ms", candidates=count, history_events=len(ids), threads=1, **machine())
        emit("model_score_cached_ms", cached, "ms", candidates=count, history_events=len(ids), threads=1, **machine())
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- main
def start_ray(worker_niceness: int) -> None:
    """A local Ray; started again (up to 3 tries) if it times out coming up, as Ray can on a busy
    machine (its raylet has 30 s to register)."""
    import ray

    for attempt in (1, 2, 3):
        try:
            ray.init(
                num_cpus=4,
                include_dashboard=False,
                log_to_driver=False,
                namespace="hstu-bench",
                _system_config={"worker_niceness": worker_niceness},
            )
            return
        except Exception as error:
            if attempt == 3 or "timed out during startup" not in str(error):
                raise
            say(f"Ray did not come up ({error}); starting it again")
            ray.shutdown()
            time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--catalogue", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load before each run")
    parser.add_argument("--connections", type=int, default=8, help="wrk's concurrent connections (closed loop)")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--replicas", type=int, default=2, help="serving replicas (serving/config.yaml's most: one per core)"
    )
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=0,
        help="nice value of Ray's workers, the replicas and proxy included (Ray's default is 15: behind "
        "anything else on the machine; a serving node runs them at 0)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log every request in the replicas (serving/config.yaml turns it off, as here by default)",
    )
    parser.add_argument("--publish-every", type=float, default=10.0)
    parser.add_argument("--retrieve-k", type=int, default=100)
    parser.add_argument("--no-swaps", action="store_true", help="skip the runs with publishes")
    parser.add_argument("--no-retrieve", action="store_true")
    parser.add_argument("--no-model", action="store_true", help="skip the in-process model figures")
    parser.add_argument("--app-arg", action="append", default=[], metavar="KEY=VALUE", help="serving config override")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print(f"error: {WRK_MISSING}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from serving.app import Recommender
    from serving.config import load_serving_config

    work = Path(tempfile.mkdtemp(prefix="hstu-serving-bench-"))
    registry = Registry(work / "registry", keep=3)
    say(f"building a {args.catalogue}-item model and {args.users} users x {HISTORY_EVENTS} events in {work}")
    model = build_bench_model(args.catalogue)
    histories = user_histories(args.users, args.catalogue)
    store = SequenceStore(SequenceStoreConfig(max_len=HISTORY_EVENTS, state_dir=work / "feast"))
    store.write_many(histories)
    store.close()
    if not args.no_model:
        model_costs(model, histories, args.candidates)
    registry.publish(model, info={"benchmark": "serving"})

    start_ray(args.worker_niceness)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logging_config = {"enable_access_log": args.access_log}  # the proxy's and the replicas'
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        config = load_serving_config(
            {
                "registry": str(registry.root),
                "features.state_dir": str(work / "feast"),
                **dict(item.split("=", 1) for item in args.app_arg),
            }
        )
        deployment = Recommender.options(num_replicas=args.replicas, logging_config=logging_config)
        serve.run(deployment.bind(config), name="bench", route_prefix="/")
        say(f"serving on {url} ({args.replicas} replica(s)); requesting each of {args.users} users")
        prime(url, args.users, args.catalogue, replicas=args.replicas)
        script = work / "load.lua"
        script.write_text(LUA)
        common = {"users": args.users, "connections": args.connections, "replicas": args.replicas}
        load = dict(url=url, script=script, users=args.users, catalogue=args.catalogue,
                    connections=args.connections, threads=args.wrk_threads)  # fmt: skip
        for candidates in args.candidates:
            for swaps in (False,) if args.no_swaps else (False, True):
                run_wrk(path="/rank", candidates=candidates, k=0, duration=args.warmup, **load)
                context = {"candidates": candidates, "swaps": swaps, **common, **machine()}
                say(f"/rank, {candidates} candidates, {'with' if swaps else 'without'} swaps, {args.duration:.0f} s")
                if swaps:
                    with Publisher(registry, model, args.publish_every) as publisher:
                        result = run_wrk(path="/rank", candidates=candidates, k=0, duration=args.duration, **load)
                    context["publishes"] = len(publisher.published)
                    context["publish_s"] = round(max((s for _, s in publisher.published), default=0.0), 3)
                    context["versions_answered"] = [result["version_min"], result["version_max"]]
                    wait_version(url, registry.latest())
                    # the next run starts warm, on the new version
                    prime(url, args.users, args.catalogue, replicas=args.replicas)
                else:
                    result = run_wrk(path="/rank", candidates=candidates, k=0, duration=args.duration, **load)
                report("rank", result, **context)
        if not args.no_retrieve:
            run_wrk(path="/retrieve", candidates=0, k=args.retrieve_k, duration=args.warmup, **load)
            say(f"/retrieve, k={args.retrieve_k} over {args.catalogue} items, {args.duration:.0f} s")
            result = run_wrk(path="/retrieve", candidates=0, k=args.retrieve_k, duration=args.duration, **load)
            report("retrieve", result, candidates=0, swaps=False, k=args.retrieve_k, catalogue=args.catalogue,
                   **common, **machine())  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
