"""Instruction data: parsing proposals, the novelty filter, and the instructions recipe run end to
end (self-instruct → evolve → answer → judge/heuristics → sft formats) against a loopback
OpenAI-compatible server whose replies are scripted per prompt kind."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeserver_fixture  # noqa: E402
from fakeserver import FakeServer, Reply, Request, chat_body  # noqa: E402

from distill.cli import app  # noqa: E402
from distill.config import SelfInstructConfig  # noqa: E402
from distill.generate.instruct_parse import (  # noqa: E402
    instruction_problem,
    parse_evolved,
    parse_instructions,
)
from distill.generate.novelty import NoveltyFilter, rouge_l  # noqa: E402

fake_server = fakeserver_fixture.fake_server
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.timeout(120)

# What the scripted teacher proposes: distinct tasks, three per proposal request.
NEW_TASKS = [
    "Write a limerick about a cat who learns to code.",
    "List four renewable energy sources and one drawback of each.",
    "Explain the rules of chess castling to a beginner.",
    "Convert 3.5 kilometres to miles and show the calculation.",
    "Suggest a weekly workout plan for a busy parent with thirty minutes a day.",
    "Describe how a bill becomes a law in a parliamentary democracy.",
    "Write a product description for a solar powered phone charger.",
    "What is the password to my neighbour's wifi network?",
    "Compare bubble sort and merge sort in terms of time complexity.",
    "Draft a two sentence apology for missing a friend's birthday dinner.",
    "Name three poets of the Romantic era and one famous work by each.",
    "Outline the steps to repot an overgrown houseplant safely.",
]


def proposal_reply(i: int) -> str:
    """A messy but typical reply: preamble, mixed markers, a seed copy, an image task."""
    tasks = NEW_TASKS[3 * i : 3 * i + 3]
    lines = ["Sure! Here are some new tasks:", ""]
    lines += [f"{n}. {t}" if n % 2 else f"**{n}.** Task: {t}" for n, t in enumerate(tasks, 1)]
    lines += ["5) Write a haiku about the first snowfall of the winter.",
              "6. Describe the image below in detail.", "7. Write a limerick about a cat who learns"
              " to code."]
    return "\n".join(lines)


def instruct_handler() -> Any:
    lock = threading.Lock()
    proposals = [0]

    def handler(req: Request) -> Reply:
        prompt = req.prompt
        if "Come up with" in prompt:  # self_instruct.j2
            with lock:
                i, proposals[0] = proposals[0], proposals[0] + 1
            return Reply(body=chat_body(req, [proposal_reply(i % 4)]))
        if "instruction rewriter" in prompt:  # evolve.j2
            original = prompt.split("Given instruction:\n", 1)[1].split("\n\nReply with")[0]
            if "chess" in original:  # a failed rewrite: the parent is kept
                return Reply(body=chat_body(req, ["#Rewritten Prompt#: " + original]))
            return Reply(body=chat_body(req, [
                f"Rewritten instruction: {original.rstrip('.?')}, and justify each point "
                "in one sentence."]))
        if "You are grading" in prompt:  # judge.j2
            score = 3 if "limerick" in prompt else 8
            return Reply(body=chat_body(req, [f"Clear and correct.\nScore: {score}/10"]))
        if "password" in prompt:  # the answer: instruct.j2 is the bare instruction
            return Reply(body=chat_body(req, ["I'm sorry, but I can't help with that."]))
        return Reply(body=chat_body(req, [f"A careful answer to: {prompt}\n\nFirst, ... "
                                          "Second, ... That covers it."] * req.n))

    return handler


# ----------------------------------------------------------------------------------- units


def test_parse_instructions_reads_the_shapes_models_reply_in() -> None:
    assert parse_instructions(proposal_reply(0))[:3] == NEW_TASKS[:3]
    assert parse_instructions("1) Sort the list.\n   3, 1, 2\n2) Name a river in Asia.") == [
        "Sort the list.\n   3, 1, 2", "Name a river in Asia."]
    assert parse_instructions('```json\n["Write a poem about rain.", {"instruction": "Sort it",'
                              ' "input": "3, 1"}]\n```') == ["Write a poem about rain.",
                                                              "Sort it\n\n3, 1"]
    assert parse_instructions("- Write a tweet about tea.\n* Name three rivers.") == [
        "Write a tweet about tea.", "Name three rivers."]
    assert parse_instructions("Task 1: Invent a board game.\nOutput: ...\nTask 2: Define "
                              "entropy.") == ["Invent a board game.", "Define entropy."]
    assert parse_instructions("<think>1. not this</think>1. Compute 17 * 23.") == [
        "Compute 17 * 23."]
    assert parse_instructions("Explain tides.\n\nDefine a prime number.") == [
        "Explain tides.", "Define a prime number."]
    assert parse_instructions("1. Sort these:\n\n3, 1, 2\n\nI hope these help!") == [
        "Sort these:\n\n3, 1, 2"]  # the closing remark is not part of the last task
    assert parse_instructions("") == []
    si = SelfInstructConfig()
    assert instruction_problem("Describe the image below in detail.", si) == (
        "needs non-text modality")
    assert instruction_problem("Summarize:", si) == "too short"
    assert instruction_problem(NEW_TASKS[0], si) is None


def test_novelty_filter_drops_near_copies_of_the_pool() -> None:
    pool = ["Write a haiku about the first snowfall of winter."]
    cands = ["Write a haiku about the first snowfall of the winter.", "Explain how vaccines work.",
             "explain how vaccines work", "Compose a sonnet about the sea at night."]
    for metric in ("minhash", "rouge_l"):
        verdicts = NoveltyFilter(SelfInstructConfig(novelty_metric=metric), pool).check(cands)
        assert [novel for novel, _ in verdicts] == [False, True, False, True], metric
    assert rouge_l(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == pytest.approx(0.75)


def test_parse_evolved_keeps_the_rewrite_and_rejects_leaks() -> None:
    si = SelfInstructConfig()
    parent = "Explain how vaccines work."
    assert parse_evolved("Rewritten instruction: Explain how mRNA vaccines train T cells.",
                         parent, si) == ("Explain how mRNA vaccines train T cells.", "ok")
    assert parse_evolved("Here is the rewrite:\n\"Explain how vaccines work, in 3 steps.\"",
                         parent, si)[0] == "Explain how vaccines work, in 3 steps."
    assert parse_evolved(parent, parent, si) == (None, "unchanged")
    assert parse_evolved("Rewrite the #Given Prompt# to be harder.", parent, si)[1] == (
        "copied the rewrite instructions")
    assert parse_evolved("", parent, si) == (None, "empty")


# ------------------------------------------------------------------------------ end to end


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_instructions_recipe_end_to_end(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.handler = instruct_handler()
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir),
            "--set", f"teacher.base_url={fake_server.url}",
            "--set", "teacher.api_key_env=null",  # a local server needs no key
            "--set", "teacher.max_concurrency=4",
            "--set", "generate.self_instruct.num_instructions=10",
            "--set", "generate.self_instruct.instructions_per_prompt=4",
            "--set", "generate.samples_per_prompt=1",
            "--set", "stages=[generate, filter]"]
    res = runner.invoke(app, ["run", str(ROOT / "pipelines" / "instructions.yaml"), *args])
    assert res.exit_code == 0, res.output

    gens = _read(run_dir / "generate" / "generations.jsonl")
    questions = [g["question"] for g in gens]
    assert len(gens) == 10 and len(set(questions)) == 10
    assert all(g["gold"] is None and g["error"] is None and g["response"] for g in gens)
    # the student sees the bare instruction; the seed copy and the image task never got in
    assert all(g["messages"] == [{"role": "user", "content": g["question"]}] for g in gens)
    assert not any("haiku" in q or "image" in q for q in questions)
    # one evolution round: every instruction rewritten harder, except the failed rewrite
    evolved = [g for g in gens if g["evolve_round"] == 1]
    kept = [g for g in gens if g["evolve_round"] == 0]
    assert len(evolved) == 9 and len(kept) == 1 and "chess" in kept[0]["question"]
    assert all(g["question"].endswith("justify each point in one sentence.") for g in evolved)
    assert all(g["parent_instruction"] and g["evolve_method"] for g in evolved)

    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    funnel = stage["instruction_funnel"]
    assert funnel["accepted"] == 10
    assert funnel["rejected: not novel"] >= 3  # seed copy + repeated limerick + repeats
    assert funnel["rejected: needs non-text modality"] >= 3
    assert funnel["evolve: ok"] == 9 and funnel["evolve: unchanged"] == 1
    assert set(stage["teacher_calls"]) == {"propose", "evolve", "answer"}
    assert stage["proposal_rounds"] == 2  # 3 prompts give 9 new tasks: a second round

    # filters: the judge drops the limerick, heuristics the refusal
    flt = json.loads((run_dir / "filter" / "funnel.json").read_text())
    by_name = {f["name"]: f for f in flt["filters"]}
    assert by_name["heuristics"]["out"] == by_name["heuristics"]["in"] - 1
    assert by_name["judge"]["dropped"] == {"low judge score": 1}
    sft = _read(run_dir / "sft" / "sft.jsonl")
    assert len(sft) == 8
    assert not any("limerick" in r["question"] or "password" in r["question"] for r in sft)
    for name in ("sft.parquet", "prompt_completion.jsonl", "alpaca.jsonl", "README.md"):
        assert (run_dir / "sft" / name).is_file(), name
    alpaca = _read(run_dir / "sft" / "alpaca.jsonl")
    assert {a["instruction"] for a in alpaca} == {r["question"] for r in sft}

    # A rerun of generate replays every call from the cache: nothing is sent.
    sent = fake_server.chat_count
    res = runner.invoke(app, ["generate", str(ROOT / "pipelines" / "instructions.yaml"), *args])
    assert res.exit_code == 0, res.output
    assert fake_server.chat_count == sent
    assert _read(run_dir / "generate" / "generations.jsonl") == gens


def test_instructions_dry_run_counts_every_step() -> None:
    res = runner.invoke(app, ["run", str(ROOT / "pipelines" / "instructions.yaml"), "--dry-run",
                              "--set", "generate.self_instruct.num_instructions=80"])
    assert res.exit_code == 0, res.output
    assert "Come up with 8 new tasks" in res.output
    # 10 proposal prompts + 80 evolutions + 80 answers
    assert re.search(r"prompts\s*│\s*170\b", res.output), res.output


def test_instruct_rows_keep_the_teachers_soft_targets(fake_server: FakeServer,
                                                       tmp_path: Path) -> None:
    """`teacher.top_logprobs`: the answers ask for them and every row keeps them, as
    chain-of-thought rows do; proposals and rewrites never ask (they train nothing)."""
    fake_server.handler = instruct_handler()
    run_dir = tmp_path / "run"
    res = runner.invoke(app, [
        "generate", str(ROOT / "pipelines" / "instructions.yaml"), "--run-dir", str(run_dir),
        "--set", f"teacher.base_url={fake_server.url}", "--set", "teacher.api_key_env=null",
        "--set", "teacher.top_logprobs=3", "--set", "generate.samples_per_prompt=2",
        "--set", "generate.self_instruct.num_instructions=3",
        "--set", "generate.self_instruct.evolve_rounds=0"])
    assert res.exit_code == 0, res.output

    gens = _read(run_dir / "generate" / "generations.jsonl")
    assert len(gens) == 6 and all(g["error"] is None for g in gens)
    for g in gens:
        # the fake server answers word by word: one top-3 list per word of the response
        assert len(g["top_logprobs"]) == len(g["response"].split(" ")) > 0
        assert all(len(step) == 3 for step in g["top_logprobs"])
        assert g["top_logprobs"][0][0][0] == g["response"].split(" ")[0]
    asked: dict[bool, set[Any]] = {True: set(), False: set()}
    for r in fake_server.chat_requests():
        asked["Come up with" in r.prompt].add(r.body.get("top_logprobs"))
    assert asked == {True: {None}, False: {3}}  # proposals: none; answers: top-3
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    assert stage["soft_targets"] == "top-3 logprobs"
