"""Choosing an implementation per call: the Triton kernel or the PyTorch reference, out loud.

Rules, in order:

1. the `impl` argument, when it is "triton" or "pytorch";
2. else the environment variable HSTU_KERNEL_IMPL, when it is "triton" or "pytorch";
3. else ("auto", None or unset) Triton for CUDA tensors, the PyTorch reference otherwise.

The choice is logged once per (op, implementation) on the `kernels` logger. Nothing falls
back silently: Triton requested for CPU tensors is an error unless this process runs Triton
in its interpreter (TRITON_INTERPRET=1 set before triton was imported), and a Triton that
cannot be imported is an error that says so.

    >>> import torch
    >>> from kernels._dispatch import resolve_impl
    >>> resolve_impl("example_op", None, torch.device("cpu"))
    'pytorch'
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import torch

IMPL_ENV = "HSTU_KERNEL_IMPL"
IMPLS = ("triton", "pytorch")
_log = logging.getLogger("kernels")
_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


class KernelInputError(ValueError):
    """An argument of a kernel op has the wrong shape, dtype, device or value."""


class KernelImplError(ValueError):
    """`impl` or HSTU_KERNEL_IMPL names no implementation."""


class KernelUnavailableError(RuntimeError):
    """The requested implementation cannot run these tensors in this process."""


def triton_interpreted() -> bool:
    """Whether Triton runs (or, once imported, will run) in its CPU interpreter in this process."""
    if "triton.language" in sys.modules:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.standard.sigmoid, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def resolve_impl(op: str, impl: str | None, device: torch.device) -> str:
    """The implementation ("triton" or "pytorch") that runs `op` on tensors on `device`."""
    requested, source = impl, f"impl={impl!r}"
    if requested in (None, "auto"):
        env = os.environ.get(IMPL_ENV, "").strip()
        requested, source = (env, f"{IMPL_ENV}={env!r}") if env not in ("", "auto") else (None, "auto")
    if requested is None:
        chosen, reason = ("triton" if device.type == "cuda" else "pytorch"), f"auto for {device.type} tensors"
    elif requested in IMPLS:
        chosen, reason = requested, f"forced by {source}"
    else:
        raise KernelImplError(f"{op}: {source} names no implementation; use 'triton', 'pytorch' or 'auto'")

    if chosen == "triton":
        try:
            import triton  # noqa: F401  (imported here, at call time, never at import time)
        except ImportError as exc:
            raise KernelUnavailableError(
                f"{op}: {source} asks for Triton, but triton cannot be imported ({exc}); use impl='pytorch'"
            ) from exc
        interpreted = triton_interpreted()
        if device.type != "cuda" and not interpreted:
            raise KernelUnavailableError(
                f"{op}: {source} asks for Triton, but the tensors are on {device} and Triton compiles for CUDA "
                "tensors only; to run the kernel on the CPU through Triton's interpreter set TRITON_INTERPRET=1 "
                "before triton is imported, or use impl='pytorch'"
            )
        if interpreted:
            reason += ", Triton interpreter"
    with _logged_lock:
        first = (op, chosen) not in _logged
        _logged.add((op, chosen))
    if first:
        _log.info("%s: using the %s implementation (%s)", op, chosen, reason)
    return chosen
