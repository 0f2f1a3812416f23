"""docs/configuration.md is what infra/config_reference.py generates from the config dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from infra.config_reference import OUTPUT, ROOTS, Root, docstring_entries, field_comments, load_class, main, render


@pytest.fixture(scope="module")
def reference() -> str:
    return render()


def test_committed_reference_is_current(reference: str) -> None:
    committed = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
    assert committed == reference, (
        "docs/configuration.md is stale: a config dataclass changed. Run `python -m infra.config_reference` "
        "and commit docs/configuration.md."
    )


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for fld in dataclasses.fields(cls):
        tp = cls.__annotations__[fld.name] if isinstance(cls.__annotations__[fld.name], type) else None
        default = getattr(cls(), fld.name)
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{fld.name}.")
        elif tp is None or not dataclasses.is_dataclass(tp):
            out.append(f"{prefix}{fld.name}")
    return out


@pytest.mark.parametrize("root", [r for r in ROOTS if r.anchor in ("streaming-job", "serving")], ids=lambda r: r.anchor)
def test_every_key_is_in_the_reference(reference: str, root: Root) -> None:
    keys = _keys(load_class(root.cls))
    assert len(keys) > 5

    # A key is covered by its own row, or by the row of a section that links to where that
    # nested config is documented already (same class, same defaults).
    def covered(key: str) -> bool:
        if f"| `{key}` |" in reference:
            return True
        parts = key.split(".")
        prefixes = (f"| `{'.'.join(parts[:n])}` |" for n in range(len(parts) - 1, 0, -1))
        return any(
            line.startswith(prefix) and "| see [" in line for prefix in prefixes for line in reference.splitlines()
        )

    missing = [key for key in keys if not covered(key)]
    assert not missing, f"keys of {root.cls} missing from the reference: {missing}"


def test_check_fails_on_a_stale_file_and_passes_on_a_fresh_one(tmp_path: Path, reference: str) -> None:
    out = tmp_path / "configuration.md"
    assert main(["--check", "--output", str(out)]) == 1  # missing
    out.write_text(reference.replace("| `max_len` |", "| `max_length` |"), encoding="utf-8")
    assert main(["--check", "--output", str(out)]) == 1  # stale
    assert main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference
    assert main(["--check", "--output", str(out)]) == 0


# ------------------------------------------------------------------------------ the conventions
@dataclass(frozen=True, kw_only=True)
class _Inner:
    """Inner settings."""

    depth: int = 1


@dataclass(frozen=True, kw_only=True)
class _Example:
    """An example config.

    alpha / beta: the two weights (a sum of
      them is 1). gamma: how many; see `delta` below; delta: the mode.
    A sentence about the class that names no field.
    """

    alpha: float = 0.5
    beta: float = 0.5  # must equal 1 - alpha
    gamma: int = 3
    # The mode, written
    # over two lines.
    delta: Literal["a", "b"] = "a"
    epsilon: tuple[str, ...] = ()  # <none> by default
    inner: _Inner = field(default_factory=lambda: _Inner(depth=2))


def test_docstring_entries_and_field_comments() -> None:
    prose, entries = docstring_entries(_Example)
    assert prose == ["An example config.", "A sentence about the class that names no field."]
    assert entries["alpha"] == entries["beta"] == "the two weights (a sum of them is 1)."
    assert entries["gamma"] == "how many; see `delta` below"
    assert entries["delta"] == "the mode."
    assert "epsilon" not in entries
    comments = field_comments(_Example)
    assert comments == {
        "beta": "must equal 1 - alpha",
        "delta": "The mode, written over two lines.",
        "epsilon": "<none> by default",
    }


def test_rendering_of_types_defaults_and_nested_configs() -> None:
    text = render((Root(anchor="example", title="Example", cls=f"{__name__}:_Example", how="How."),))
    assert "A sentence about the class that names no field.\n" in text
    assert "| `delta` | `a` \\| `b` | `a` | the mode. The mode, written over two lines. |" in text
    assert "| `epsilon` | list[str] | `[]` | &lt;none> by default |" in text
    assert "| `inner.depth` | int | `2` |" in text  # the parent's default, not the class's
    assert '<a id="example-inner"></a>' in text
