"""Where things live on disk: the checkout, its git-ignored state folder, and the shared data.

Every path the project uses is derived here, so a reader can find them in one place.

    >>> from config.paths import REPO_ROOT, state_dir, shared_data_dir
    >>> (shared_data_dir() / "ml-100k" / "u.data.gz").exists()
    True
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def state_dir(*parts: str) -> Path:
    """A folder under the git-ignored `.state/` of the checkout (created on demand).

    `HSTU_STATE_DIR` moves the whole state folder, e.g. to keep test runs apart.
    """
    root = Path(os.environ.get("HSTU_STATE_DIR", REPO_ROOT / ".state"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path:
    """The public datasets: `../shared/data` beside the checkout, or `HSTU_SHARED_DATA`."""
    path = Path(os.environ.get("HSTU_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder {path} does not exist: clone the project beside ../shared "
            "or set HSTU_SHARED_DATA to the folder that holds ml-100k/"
        )
    return path
