"""config/loader.py: YAML + overrides into frozen dataclasses, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from config.loader import ConfigError, load_config, parse_overrides, to_dict


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (1, 2)
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    epochs: int = 3
    flag: bool = False
    alpha: float | None = None
    out: Path = Path("x")
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs ({self.epochs}) must be >= 1")


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: run\nepochs: 5\ninner:\n  lr: 1e-4\n  dims: [3, 4]\n")
    cfg = load_config(Outer, path, ["inner.kind=b", "alpha=1.5", "flag=true", "out=/tmp/o"])
    assert cfg == Outer(
        name="run", epochs=5, flag=True, alpha=1.5, out=Path("/tmp/o"), inner=Inner(lr=1e-4, kind="b", dims=(3, 4))
    )
    assert to_dict(cfg)["inner"]["dims"] == [3, 4]
    assert load_config(Outer, path, ["alpha=null"]).alpha is None


def test_fixed_size_tuples_convert_each_value_with_its_own_type() -> None:
    cfg = load_config(Outer, overrides=["name=a", "inner.betas=[0.5, 1]"])
    assert cfg.inner.betas == (0.5, 1.0) and isinstance(cfg.inner.betas[1], float)
    with pytest.raises(ConfigError, match=r"key 'inner.betas': expected 2 values"):
        load_config(Outer, overrides=["name=a", "inner.betas=[0.5]"])


def test_override_wins_and_int_widens_to_float() -> None:
    cfg = load_config(Outer, overrides=["name=a", "inner.lr=2"])
    assert cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["name=a", "epoch=3"], "unknown key 'epoch'"),
        (["name=a", "inner.lrr=3"], "unknown key 'inner.lrr'"),
        (["name=a", "epochs=3.5"], "key 'epochs': 3.5 is not an int"),
        (["name=a", "flag=1"], "key 'flag': 1 is not a bool"),
        (["name=a", "inner.kind=c"], "key 'inner.kind': 'c' is not one of ['a', 'b']"),
        (["name=a", "inner.dims=[1, x]"], "key 'inner.dims[1]'"),
        (["name=a", "inner=3"], "inner: expected a mapping"),
        (["epochs=2"], "missing required key 'name'"),
        (["name=a", "epochs=0"], "epochs (0) must be >= 1"),
        (["name"], "not of the form key=value"),
        (["name=5"], "key 'name': 5 is not a string"),
    ],
)
def test_rejections_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Outer, overrides=overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, listing)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("name: a\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'bogus'.*unknown\.yaml"):
        load_config(Outer, unknown)


def test_parse_overrides_conflict() -> None:
    with pytest.raises(ConfigError, match="already set to a value"):
        parse_overrides(["a=1", "a.b=2"])
