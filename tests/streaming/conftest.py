"""Fixtures of the streaming tests: one local Ray instance for the whole session (it takes seconds
to start on a small machine), sized for two cores."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """The GCS address of a Ray instance started for the tests (subprocess jobs join it)."""
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=False, namespace="hstu",
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
