"""Logging for entry scripts: one format, our progress at INFO, third-party chatter at WARNING.

    >>> from config.logs import setup_logging
    >>> setup_logging()          # in an entry script's main(), before any work

Libraries log through `logging.getLogger(__name__)` and never configure logging themselves;
entry scripts (`python -m streaming.job`, `trainer/stream_train.py`, ...) call `setup_logging`
once. Deprecation warnings that third-party packages raise inside their own code (kafka-python
reading its schemas through a deprecated importlib API, Ray Data's DataContext defaults) are
filtered with `third_party_deprecations()` around the call into that package, where we make it,
so nothing of ours is hidden.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

FORMAT = "%(asctime)s %(name)s %(message)s"
# Loggers that report per call (connections, registry-cache refreshes) at INFO.
CHATTY = ("kafka", "feast.infra.registry", "feast", "ray.data", "urllib3", "filelock")


def setup_logging(level: int = logging.INFO, *, chatty: tuple[str, ...] = CHATTY) -> None:
    """Log to stderr at `level` with one format; `chatty` third-party loggers only from WARNING."""
    logging.basicConfig(level=level, stream=sys.stderr, format=FORMAT)
    for name in chatty:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def third_party_deprecations() -> Iterator[None]:
    """Ignore DeprecationWarnings raised in the block: wrap only a call into a third-party package
    whose own internals raise them, and say which in a comment there.

        >>> with third_party_deprecations():
        ...     import kafka  # noqa: F401  (kafka-python 3.0 reads its schemas via importlib.resources.read_text)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
