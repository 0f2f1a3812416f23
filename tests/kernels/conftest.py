"""Fixtures for the kernel tests: the GPU probe (at call time) and the interpreter subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
INTERPRETER_TIMEOUT_S = 480


@pytest.fixture
def cuda_device() -> str:
    """'cuda' where a GPU runs compiled Triton kernels in this process; the test skips otherwise."""
    from kernels._dispatch import triton_interpreted

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU in this process")
    if triton_interpreted():
        pytest.skip("Triton runs in its interpreter in this process (TRITON_INTERPRET=1): no compiled kernels to test")
    return "cuda"


def run_interpreted_pytest(test_file: str) -> None:
    """Run one tests/kernels/interpreted_*.py file in its own pytest process with TRITON_INTERPRET=1.

    Triton picks interpreter or compiler once per process, when triton is imported; a separate
    process keeps the interpreter away from every other test (and from GPU tests).
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("HSTU_KERNEL_IMPL", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "--timeout",
        str(INTERPRETER_TIMEOUT_S),
        test_file,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=INTERPRETER_TIMEOUT_S + 60
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} ran past {INTERPRETER_TIMEOUT_S + 60} s:\n{(exc.stdout or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert " passed" in summary and "skipped" not in summary, f"the interpreter run did not run its tests: {summary!r}"


@pytest.fixture
def interpreted_pytest():
    return run_interpreted_pytest
