"""evaluate on Ray: each model's held-out items in shards give the local predictions, for an API
teacher (through the run's cache) and for local models (a model directory, and an in-memory
model shipped to the workers as the base student is)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer  # noqa: E402
from ray_fixture import ray_cluster, sum_config  # noqa: E402

from distill.config import PipelineConfig  # noqa: E402
from distill.evaluate.stage import Evaluation, eval_teacher, local  # noqa: E402
from distill.records import RunDir  # noqa: E402
from tests.projects import write_sum_project  # noqa: E402

fake_server = fakeserver_fixture.fake_server
__all__ = ["ray_cluster", "fake_server"]
pytestmark = pytest.mark.timeout(300)
MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "demo-teacher"


def with_evaluate(cfg: PipelineConfig) -> PipelineConfig:
    data = cfg.model_dump(mode="json")
    data["evaluate"] = {"dataset": "seeds.jsonl", "samples": 3, "temperature": 0.7,
                        "max_tokens": 8, "batch_size": 4}
    return PipelineConfig.model_validate(data)


def untimed(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k != "latency_s"} for p in preds]


def evaluation(cfg: PipelineConfig, run: Path) -> Evaluation:
    return Evaluation(cfg, RunDir(run))


def test_api_teacher_items_in_shards_give_the_local_predictions(
        ray_cluster: Any, fake_server: FakeServer, tmp_path: Path) -> None:
    write_sum_project(tmp_path, 7)
    local_ev = evaluation(with_evaluate(sum_config(tmp_path, fake_server.url)), tmp_path / "l")
    eval_teacher(local_ev, RunDir(tmp_path / "l"))
    sent = fake_server.chat_count
    ray_cfg = with_evaluate(sum_config(tmp_path, fake_server.url,
                                       executor={"kind": "ray", "shards": 3}))
    ray_ev = evaluation(ray_cfg, tmp_path / "r")
    eval_teacher(ray_ev, RunDir(tmp_path / "r"))
    assert fake_server.chat_count == 2 * sent
    assert untimed(ray_ev.preds) == untimed(local_ev.preds)
    assert len(ray_ev.preds) == 7 * (1 + 3)  # greedy + 3 sampled per item
    for key in ("accuracy", "ci", "n", "pass_at_k", "maj_at_k"):
        assert ray_ev.models["teacher"][key] == local_ev.models["teacher"][key], key
    again = evaluation(ray_cfg, tmp_path / "r")
    eval_teacher(again, RunDir(tmp_path / "r"))
    assert fake_server.chat_count == 2 * sent  # the run's cache (on the driver) answered
    assert untimed(again.preds) == untimed(local_ev.preds)


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="demo teacher missing")
def test_local_models_in_shards_give_the_local_predictions(ray_cluster: Any,
                                                           tmp_path: Path) -> None:
    write_sum_project(tmp_path, 7)
    local_ev = evaluation(with_evaluate(sum_config(tmp_path, "unused")), tmp_path / "l")
    ray_ev = evaluation(with_evaluate(sum_config(tmp_path, "unused", executor={
        "kind": "ray", "shards": 2})), tmp_path / "r")
    for ev in (local_ev, ray_ev):
        ev.score("student", local(MODEL, 4))
    assert greedy(local_ev.preds) == greedy(ray_ev.preds)
    assert local_ev.models["student"]["accuracy"] == ray_ev.models["student"]["accuracy"]
    # A local model seeds each batch by its first job and a shard regroups the batches: the
    # sampled answers are other draws, but every one is there.
    assert answered(local_ev.preds) == answered(ray_ev.preds)

    base = local(MODEL, 4)
    base._ensure_loaded()  # in memory only, as the base student is: shipped to the workers
    ray_ev.score("base_student", local(Path("base"), 4, base.model, base.tokenizer))
    shipped = [p for p in ray_ev.preds if p["model"] == "base_student"]
    assert greedy(shipped) == [p | {"model": "base_student"} for p in greedy(local_ev.preds)]
    assert len(shipped) == len(local_ev.preds)


def greedy(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return untimed([p for p in preds if p["mode"] == "greedy"])


def answered(preds: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(p["id"], p["mode"], p["sample"]) for p in preds if not p["error"]]
