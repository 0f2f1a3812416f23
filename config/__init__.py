"""The ground layer: what every other package may use and which itself imports none of them.

- `config.loader`: typed configuration, frozen dataclasses from YAML plus `key=value` overrides;
- `config.paths`: where things live on disk (the checkout, its `.state/`, the shared data);
- `config.logs`: logging set-up for entry scripts, and quieting third-party chatter.

The layers above, lowest first, are `kernels`, `features`, `streaming`, `trainer`, `serving`,
then the tools (`infra`, `benchmarks`); `lint-imports` (contracts in pyproject.toml) holds them.
"""
