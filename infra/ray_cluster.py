"""A Ray cluster on this machine: `ray start --head`, and more nodes with `ray start --address`,
bound to 127.0.0.1 with Ray's token authentication on, stopped without touching any other Ray
instance (`ray stop` would stop every Ray of the machine). The main loop (infra/loop.py) runs
the stream trainer and the Serve app on one; the tests start their own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from config.paths import REPO_ROOT

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(token: str | None = None) -> dict[str, str]:
    """The environment for `ray` commands, without an inherited RAY_ADDRESS; with `token`, Ray's
    token authentication on and that token (a cluster and its clients share it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    # The cluster's jobs run `python` from its PATH: this environment's, as after `source .venv/bin/activate`.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Its workers import the project from this checkout (a submitted job's working dir goes first).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # Serve's controller gives a new HTTP proxy 5 s to be ready before it kills it (and the deploy
    # fails); a worker process takes longer than that to start on a busy small machine.
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


class LocalCluster:
    """`ray start --head` with its own temp folder (and dashboard, for `ray job submit`)."""

    def __init__(self, name: str, *, num_cpus: int = 4, dashboard: bool = True) -> None:
        import secrets

        self.token = secrets.token_hex(16)  # Ray authenticates every client of the cluster with it
        # Ray's socket paths must stay short: a folder directly under /tmp.
        self.temp = Path(f"/tmp/ray-{name[-16:]}-{os.getpid()}")
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus
        self.with_dashboard = dashboard

    @property
    def env(self) -> dict[str, str]:
        """The environment for commands that talk to this cluster (`ray job submit`, drivers)."""
        return ray_env(self.token)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, attempts: int = 2) -> LocalCluster:
        """Start the head; a start that fails (Ray gives a raylet 30 s to register, which a busy
        small machine can miss) is cleaned up, and tried again up to `attempts` times in all."""
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return self
            except RuntimeError:
                if attempt == attempts:
                    raise
            time.sleep(2)
        raise ValueError(f"attempts ({attempts}) must be >= 1")

    def _start(self) -> None:
        try:
            out = subprocess.run(
                [
                    RAY,
                    "start",
                    "--head",
                    f"--port={self.port}",
                    f"--num-cpus={self.num_cpus}",
                    "--node-ip-address=127.0.0.1",
                    f"--include-dashboard={str(self.with_dashboard).lower()}",
                    f"--dashboard-port={self.dashboard_port}",
                    "--dashboard-host=127.0.0.1",
                    f"--temp-dir={self.temp}",
                    # The agent's HTTP port (how `ray job submit` reaches it) defaults to 52365: any
                    # other Ray of the machine (a test session's, a user's) holding it leaves this
                    # head without a job agent ("No available agent to submit job").
                    f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if out.returncode != 0:
                raise RuntimeError(f"ray start --head failed: {out.stderr[-2000:]}")
            if self.with_dashboard:
                self._wait_for_job_agent()
        except BaseException:  # a half-started head (its GCS, dashboard, ...) must not outlive the failure
            self.stop()
            raise

    def _wait_for_job_agent(self, timeout_s: float = 120) -> None:
        """The job server answers before the agent that runs jobs is up: wait for `ray job list`."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = subprocess.run(
                [RAY, "job", "list", f"--address={self.dashboard}"],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster's job server did not answer in {timeout_s:.0f} s: {out.stderr[-1000:]}"
                )
            time.sleep(1)

    def submit(self, argv: list[str], *, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
        """`ray job submit --address <dashboard> ARGV...`, tried again while the job server says
        it has no agent yet (it can answer `ray job list` before its agent takes jobs)."""
        deadline = time.monotonic() + timeout_s
        while True:
            out = subprocess.run(
                [RAY, "job", "submit", f"--address={self.dashboard}", *argv],
                cwd=cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 10),
            )
            if "No available agent to submit job" not in out.stdout + out.stderr or time.monotonic() > deadline - 60:
                return out
            time.sleep(3)

    def add_node(self, *, num_cpus: int = 2, resources: str | None = None) -> None:
        args = [
            RAY,
            "start",
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",  # not the head's (see _start)
            "--disable-usage-stats",
        ]
        if resources:
            args.append(f"--resources={resources}")
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --address failed: {out.stderr[-2000:]}")

    def stop(self) -> None:
        """Terminate every process of this cluster: those started with its temp folder or its GCS
        port in their command line, and all their descendants."""
        marks = (str(self.temp), f":{self.port}")
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(mark in cmdline for mark in marks) and proc.pid != os.getpid():
                roots.append(proc)
        victims = {p.pid: p for root in roots for p in [root, *_children(root)]}
        for proc in victims.values():
            _signal(proc, "terminate")
        _, alive = psutil.wait_procs(list(victims.values()), timeout=15)
        for proc in alive:
            _signal(proc, "kill")
        time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _signal(proc: psutil.Process, how: str) -> None:
    try:
        getattr(proc, how)()
    except psutil.Error:
        pass
