"""infra/compose.yaml and infra/Dockerfile against the code they run (Docker itself is not on CI's
machine): the topics service creates the topics the local broker gets, with the same partitions;
the loop's image runs a module that exists, on the broker the topics service created, with the
checkout's shared data mounted where the image looks for it."""

from __future__ import annotations

import re

import yaml

from config.paths import REPO_ROOT, shared_data_dir
from infra.kafka.broker import BrokerConfig
from infra.main_job import TOPIC
from streaming.config import StreamJobConfig

INFRA = REPO_ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())


def dockerfile() -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            lines.setdefault(word, []).append(rest)
    return lines


def test_the_topics_service_creates_the_local_brokers_topics() -> None:
    (script,) = COMPOSE["services"]["topics"]["command"]
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", script))
    local = {t.name: str(t.partitions) for t in BrokerConfig().topics}
    assert created == local
    assert TOPIC in created and StreamJobConfig().dlq_topic in created


def test_the_loop_image_runs_the_main_job_with_the_checkouts_data() -> None:
    loop = COMPOSE["services"]["loop"]
    context = (INFRA / loop["build"]["context"]).resolve()
    assert context == REPO_ROOT and (context / loop["build"]["dockerfile"]).is_file()
    steps = dockerfile()
    (entrypoint,) = steps["ENTRYPOINT"]
    module = yaml.safe_load(entrypoint)[-1]  # ["python", "-m", "infra.main_job"]
    assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert "requirements.lock ." in steps["COPY"] and any("-r requirements.lock" in r for r in steps["RUN"])
    mounts = dict(v.rsplit(":", 2)[:2] if v.count(":") == 2 else v.split(":") for v in loop["volumes"])
    data = next(src for src, dst in mounts.items() if dst == "/data")
    assert (INFRA / data).resolve() == shared_data_dir().resolve()
    assert any("HSTU_SHARED_DATA=/data" in env for env in steps["ENV"])
    assert loop["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert "--bootstrap" in loop["command"] and "127.0.0.1:9092" in COMPOSE["services"]["kafka"]["ports"][0]
