"""The sft set's export formats round-trip through `datasets`; the dataset card carries its fields;
`distill push` makes exactly the Hub requests it should (HfApi faked: no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.config import PipelineConfig
from distill.formats import (
    FORMAT_FILES,
    alpaca_rows,
    dataset_card,
    prompt_completion_rows,
    read_card_metadata,
    seed_license,
    write_formats,
)
from distill.train.dataset import dataset_card as stage_dataset_card

runner = CliRunner()
pytestmark = pytest.mark.timeout(60)

SFT: list[dict[str, Any]] = [
    {"id": "q0#0", "seed_id": "q0", "question": "What is 2 + 3?", "gold": "5", "answer": "5",
     "messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 3?\nLet's think step by step."},
                  {"role": "assistant", "content": "2 + 3 = 5.\nThe answer is 5."}]},
    {"id": "q1#1", "seed_id": "q1", "question": "Écris un haïku.", "gold": None, "answer": None,
     "messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Écris un haïku."},
                  {"role": "assistant", "content": "Neige sur le toit —\nle chat ne bouge pas."}]},
]
FUNNEL: dict[str, Any] = {"in": 5, "out": 2, "filters": [
    {"name": "errors", "in": 5, "out": 5, "dropped": {}},
    {"name": "verify", "in": 5, "out": 3, "dropped": {"wrong answer": 2}},
    {"name": "dedup.exact", "in": 3, "out": 2, "dropped": {"exact duplicate": 1}}]}


def make_cfg(tmp_path: Path, **teacher: Any) -> PipelineConfig:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "seeds.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    (tmp_path / "data" / "LICENSE").write_text("MIT License\n\nCopyright (c) 2021 Someone\n")
    return PipelineConfig.model_validate({
        "name": "card-test", "root": str(tmp_path), "seeds": {"path": "data/seeds.jsonl"},
        "teacher": {"backend": "openai", "model": "gpt-x", **teacher}})


def test_formats_round_trip_through_datasets(tmp_path: Path) -> None:
    from datasets import Dataset, load_dataset

    written = write_formats(tmp_path, SFT)
    assert written == FORMAT_FILES
    parquet = Dataset.from_parquet(str(tmp_path / "sft.parquet")).to_list()
    assert parquet == SFT
    pc = load_dataset("json", data_files=str(tmp_path / "prompt_completion.jsonl"),
                      split="train").to_list()
    assert pc == prompt_completion_rows(SFT)
    assert pc[0] == {"id": "q0#0", "system": "Be brief.",
                     "prompt": "What is 2 + 3?\nLet's think step by step.",
                     "completion": "2 + 3 = 5.\nThe answer is 5."}
    alpaca = load_dataset("json", data_files=str(tmp_path / "alpaca.jsonl"),
                          split="train").to_list()
    assert alpaca == alpaca_rows(SFT)
    assert alpaca[1] == {"instruction": "Écris un haïku.", "input": "",
                         "output": "Neige sur le toit —\nle chat ne bouge pas.",
                         "system": "Be brief."}
    # an empty curated set still writes valid (empty) files
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"
    empty.mkdir()
    write_formats(empty, [])
    assert pq.read_table(empty / "sft.parquet").num_rows == 0
    assert (empty / "alpaca.jsonl").read_text() == ""


def test_dataset_card_has_licences_teacher_counts_funnel_and_command(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, terms="Example Terms v1: no competing models.")
    card = dataset_card(cfg, FUNNEL, 2)
    assert card == stage_dataset_card(cfg, FUNNEL, 2)  # what the filter stage writes
    meta = read_card_metadata(card)
    assert meta["license"] == "other"
    assert meta["seed_license"] == "mit"  # read from data/LICENSE beside the seed file
    assert meta["teacher"] == "openai:gpt-x"
    assert meta["teacher_terms"] == "Example Terms v1: no competing models."
    assert meta["counts"] == {"generated": 5, "kept": 2, "rows": 2}
    assert meta["filters"] == ["errors", "verify", "dedup.exact"]
    assert meta["funnel"][1] == {"filter": "verify", "in": 5, "out": 3,
                                 "dropped": {"wrong answer": 2}}
    assert meta["command"].startswith("distill ")
    assert meta["size_categories"] == ["n<1K"]
    assert {c["config_name"]: c["data_files"] for c in meta["configs"]} == {
        "default": "sft.jsonl", "prompt_completion": "prompt_completion.jsonl",
        "alpaca": "alpaca.jsonl"}
    assert "| verify | 5 | 3 | wrong answer: 2 |" in card
    # explicit licence wins; no terms configured says so
    cfg2 = make_cfg(tmp_path).model_copy(
        update={"seeds": make_cfg(tmp_path).seeds.model_copy(update={"license": "cc-by-4.0"})})
    assert seed_license(cfg2) == "cc-by-4.0"
    assert "unspecified" in read_card_metadata(dataset_card(cfg2, FUNNEL, 2))["teacher_terms"]


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, sends nothing."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token: str | None = None, **_: Any) -> None:
        FakeHub.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, **kw: Any) -> None:
        FakeHub.calls.append(("upload_folder", kw))


def test_push_uploads_the_sft_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    cfg = make_cfg(tmp_path)
    sft = tmp_path / "run" / "sft"
    (sft / "dataset").mkdir(parents=True)  # the local `datasets` copy is not uploaded
    (sft / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT))
    (sft / "README.md").write_text(dataset_card(cfg, FUNNEL, 2))
    write_formats(sft, SFT)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []

    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = runner.invoke(app, ["push", str(tmp_path / "run"), "me/gsm8k-cot"])
    assert res.exit_code == 2 and "HF_TOKEN" in res.output and not FakeHub.calls

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    res = runner.invoke(app, ["push", str(tmp_path / "run"), "not a repo"])
    assert res.exit_code == 2 and "REPO_ID" in res.output

    res = runner.invoke(app, ["push", str(tmp_path / "run"), "me/gsm8k-cot", "--private"])
    assert res.exit_code == 0, res.output
    assert "hf_secret_value" not in res.output
    assert "https://huggingface.co/datasets/me/gsm8k-cot" in res.output
    (_, init), (_, create), (_, upload) = FakeHub.calls
    assert init == {"token": "hf_secret_value"}
    assert create == {"repo_id": "me/gsm8k-cot", "repo_type": "dataset", "private": True,
                      "exist_ok": True, "token": "hf_secret_value"}
    assert upload["repo_id"] == "me/gsm8k-cot" and upload["repo_type"] == "dataset"
    assert upload["folder_path"] == str(sft)
    assert upload["allow_patterns"] == ["README.md", "sft.jsonl", "sft.parquet",
                                        "prompt_completion.jsonl", "alpaca.jsonl"]
    assert upload["commit_message"] == "distill: 2 rows from pipeline card-test"

    res = runner.invoke(app, ["push", str(tmp_path / "nowhere"), "me/x"])
    assert res.exit_code == 2 and "filter stage" in res.output
