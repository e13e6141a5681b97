"""Instruction-response data: self-instruct from seed tasks, optional evol-instruct, answers.

    seed tasks ──► propose (teacher lists new instructions from sampled examples) ──► parse
               ──► novelty filter (vs the whole pool) ──► evolve (rewrite harder, optional)
               ──► answer (teacher) ──► generation rows (question = instruction, gold None)

Proposal rounds repeat until `num_instructions` new instructions passed the novelty filter or
`max_rounds` ran out. Every teacher call goes through `engine.run_jobs` with the run's response
cache, and every prompt is a deterministic function of the pipeline seed and the cached replies
before it, so a rerun reproduces the same pool and sends nothing.

The rows keep the generation schema, so the judge and heuristics filters apply unchanged; the
student is trained on the bare instruction (`messages`), whatever the answer template adds. With
`teacher.top_logprobs` the answers carry soft targets, as chain-of-thought rows do. Reading the
replies is `instruct_parse`; the novelty filter is `novelty`.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from distill.answers import split_think
from distill.config import ConfigError, PipelineConfig, SelfInstructConfig
from distill.generate import batching, soft_targets
from distill.generate.cot import teacher_name
from distill.generate.instruct_parse import instruction_problem, parse_evolved, parse_instructions
from distill.generate.novelty import NoveltyFilter
from distill.generate.templates import chat_messages, render
from distill.records import GenerationRow, RunDir, make_generation_row
from distill.seeds import read_rows
from distill.teachers import make_teacher
from distill.teachers.base import Completion, Job, SamplingParams, completion_cost
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import EngineStats, run_jobs

# ------------------------------------------------------------------------------- seed tasks


def load_seed_tasks(cfg: PipelineConfig) -> list[dict[str, str]]:
    """Seed tasks as {id, instruction, input, output}: `self_instruct.seed_tasks`, else
    `seeds.path` read with seeds.question_field / answer_field / id_field."""
    si = self_instruct(cfg)
    a: str | None
    idf: str | None
    if si.seed_tasks:
        path, field = cfg.resolve(si.seed_tasks), "generate.self_instruct.seed_tasks"
        q, a, idf = "instruction", "output", "id"
    elif cfg.seeds.path:
        path, field = cfg.resolve(cfg.seeds.path), "seeds.path"
        q, a, idf = cfg.seeds.question_field, cfg.seeds.answer_field, cfg.seeds.id_field
    else:
        raise ConfigError("generate.self_instruct.seed_tasks: instruct needs a seed task file "
                          "(set it, or seeds.path)")
    tasks = []
    for i, row in enumerate(read_rows(path, field)):
        text = row.get(q) if q in row else row.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}: row {i + 1}: missing field {q!r}")
        out = row.get(a) if a else None
        tasks.append({"id": str(row.get(idf) if idf and row.get(idf) is not None else f"seed-{i}"),
                      "instruction": text.strip(), "input": str(row.get("input") or "").strip(),
                      "output": "" if out is None else str(out).strip()})
    if not tasks:
        raise ConfigError(f"{path}: no seed tasks")
    return tasks[: cfg.seeds.limit] if cfg.seeds.limit and not si.seed_tasks else tasks


def self_instruct(cfg: PipelineConfig) -> SelfInstructConfig:
    return cfg.generate.self_instruct or SelfInstructConfig()


def answer_template(cfg: PipelineConfig) -> Path:
    return cfg.resolve(self_instruct(cfg).answer_prompt or cfg.generate.prompt)


# ---------------------------------------------------------------------------------- prompts


def _params(cfg: PipelineConfig, temperature: float, max_tokens: int, top_logprobs: int = 0
            ) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(temperature=temperature, top_p=g.top_p, max_tokens=max_tokens,
                          seed=g.seed if g.seed is not None else cfg.seed,
                          top_logprobs=top_logprobs)


def proposal_jobs(cfg: PipelineConfig, tasks: list[dict[str, str]], machine: list[str],
                  round_: int, n_prompts: int) -> list[Job]:
    """`n_prompts` proposal prompts, each with examples drawn by a seeded RNG (reruns: same)."""
    si = self_instruct(cfg)
    params = _params(cfg, si.temperature, si.max_tokens)
    jobs = []
    for i in range(n_prompts):
        rng = random.Random(cfg.seed * 1_000_003 + round_ * 10_007 + i)
        n_machine = min(si.machine_examples_per_prompt, len(machine), si.examples_per_prompt)
        n_human = min(si.examples_per_prompt - n_machine, len(tasks))
        examples = rng.sample(tasks, n_human) + [
            {"instruction": t, "input": "", "output": ""} for t in rng.sample(machine, n_machine)]
        rng.shuffle(examples)
        msgs = chat_messages(cfg.resolve(si.prompt), None, examples=examples,
                             num=si.instructions_per_prompt)
        jobs.append(Job(key=f"propose-r{round_}-{i}", messages=msgs, params=params, samples=[0]))
    return jobs


def evolve_method(cfg: PipelineConfig, instruction_id: str, round_: int) -> str:
    """The rewrite an instruction gets in a round: seeded, so reruns send the same prompt."""
    rng = random.Random(f"{cfg.seed}:{round_}:{instruction_id}")
    return rng.choice(self_instruct(cfg).evolve_methods)


def evolve_jobs(cfg: PipelineConfig, pool: list[dict[str, Any]], round_: int) -> list[Job]:
    si = self_instruct(cfg)
    params = _params(cfg, si.temperature, si.max_tokens)
    jobs = []
    for inst in pool:
        method = evolve_method(cfg, inst["instruction_id"], round_)
        msgs = chat_messages(cfg.resolve(si.evolve_prompt), None, instruction=inst["text"],
                             method=method)
        jobs.append(Job(key=f"evolve-e{round_}-{inst['instruction_id']}", messages=msgs,
                        params=params, samples=[0]))
    return jobs


def student_messages(cfg: PipelineConfig, instruction: str) -> list[dict[str, str]]:
    """What the student sees: the bare instruction (after the pipeline's system prompt)."""
    sys_prompt = cfg.generate.system_prompt
    return ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + [
        {"role": "user", "content": instruction}]


def answer_jobs(cfg: PipelineConfig, instructions: list[dict[str, Any]]) -> list[Job]:
    """The answer prompts; they ask for `teacher.top_logprobs` (the rows' soft targets)."""
    g = cfg.generate
    params = _params(cfg, g.temperature, g.max_tokens, cfg.teacher.top_logprobs)
    template = answer_template(cfg)
    return [Job(key=inst["instruction_id"],
                messages=chat_messages(template, g.system_prompt, instruction=inst["text"],
                                       question=inst["text"], input=""),
                params=params, samples=list(range(g.samples_per_prompt)))
            for inst in instructions]


def dry_run_jobs(cfg: PipelineConfig) -> list[Job]:
    """What a run sends when the first proposal round already yields enough novel instructions
    (fewer novel proposals mean more rounds): proposals, evolutions, answers. Seed instructions
    stand in for the not-yet-generated ones in the evolution and answer prompts."""
    si = self_instruct(cfg)
    tasks = load_seed_tasks(cfg)
    render(cfg.resolve(si.prompt), "generate.self_instruct.prompt", examples=tasks[:1], num=1)
    n_prompts = math.ceil(si.num_instructions / si.instructions_per_prompt)
    jobs = proposal_jobs(cfg, tasks, [], 0, n_prompts)
    stand_ins = [{"instruction_id": f"inst-{i:05d}",
                  "text": tasks[i % len(tasks)]["instruction"]} for i in range(si.num_instructions)]
    for e in range(1, si.evolve_rounds + 1):
        jobs += evolve_jobs(cfg, stand_ins, e)
    answered = si.num_instructions * (1 + (si.evolve_rounds if si.evolve_keep_original else 0))
    jobs += answer_jobs(cfg, (stand_ins * (1 + si.evolve_rounds))[:answered])
    return jobs


# ------------------------------------------------------------------------------------- stage


class _Calls:
    """One teacher and one cache for the whole stage; engine stats summed per step."""

    def __init__(self, cfg: PipelineConfig, run_dir: RunDir, cache: ResponseCache) -> None:
        self.cfg = cfg
        self.teacher = make_teacher(cfg.teacher, batch_record=batching.record_path(run_dir),
                                    **soft_targets.teacher_options(cfg))
        self.cache = cache
        self.steps: dict[str, EngineStats] = {}
        self.cost: defaultdict[str, float] = defaultdict(float)
        """What each step's completions cost, cached or not (the rows' cost_usd convention)."""

    def run(self, step: str, jobs: list[Job], description: str, *, need_logprobs: bool = False
            ) -> dict[tuple[str, int], Completion]:
        if not jobs:
            return {}
        results, stats = run_jobs(self.teacher, jobs, self.cache,
                                  price_in=self.cfg.teacher.price_in_per_mtok,
                                  price_out=self.cfg.teacher.price_out_per_mtok,
                                  description=description, need_logprobs=need_logprobs)
        self.steps.setdefault(step, EngineStats()).add(stats)
        t = self.cfg.teacher
        self.cost[step] += sum(completion_cost(c, t.price_in_per_mtok, t.price_out_per_mtok)
                               for c in results.values())
        return results

    @property
    def budget_stopped(self) -> bool:
        return any(s.budget_stopped for s in self.steps.values())


def _propose(cfg: PipelineConfig, calls: _Calls, tasks: list[dict[str, str]],
             counts: Counter[str]) -> tuple[list[dict[str, Any]], int]:
    """Proposal rounds until num_instructions novel instructions (or max_rounds)."""
    si = self_instruct(cfg)
    novelty = NoveltyFilter(si, [t["instruction"] for t in tasks])
    pool: list[dict[str, Any]] = []
    rounds = 0
    for r in range(si.max_rounds):
        missing = si.num_instructions - len(pool)
        if missing <= 0 or calls.budget_stopped:
            break
        rounds += 1
        jobs = proposal_jobs(cfg, tasks, [p["text"] for p in pool], r,
                             math.ceil(missing / si.instructions_per_prompt))
        results = calls.run("propose", jobs, f"self-instruct: propose (round {r + 1})")
        for job in jobs:  # job order, not arrival order: the pool is deterministic
            comp = results[(job.key, 0)]
            if comp.error:
                counts["proposal errors"] += 1
                continue
            parsed = parse_instructions(comp.text)
            counts["proposed"] += len(parsed)
            usable = []
            for text in parsed:
                problem = instruction_problem(text, si)
                if problem:
                    counts[f"rejected: {problem}"] += 1
                else:
                    usable.append(text)
            for text, (novel, _) in zip(usable, novelty.check(usable), strict=True):
                if not novel:
                    counts["rejected: not novel"] += 1
                elif len(pool) >= si.num_instructions:
                    counts["surplus"] += 1
                else:
                    pool.append({"instruction_id": f"inst-{len(pool):05d}", "text": text,
                                 "proposal_round": r, "proposal": job.key,
                                 "evolve_round": 0, "evolve_method": None, "parent": None})
    counts["accepted"] = len(pool)
    return pool, rounds


def _evolve(cfg: PipelineConfig, calls: _Calls, pool: list[dict[str, Any]],
            counts: Counter[str]) -> list[dict[str, Any]]:
    """Evol-instruct: each round rewrites every instruction; a failed rewrite keeps its parent."""
    si = self_instruct(cfg)
    answered = list(pool) if si.evolve_keep_original else []
    current = pool
    for e in range(1, si.evolve_rounds + 1):
        if calls.budget_stopped:
            break
        jobs = evolve_jobs(cfg, current, e)
        results = calls.run("evolve", jobs, f"evol-instruct: round {e}/{si.evolve_rounds}")
        nxt = []
        for inst, job in zip(current, jobs, strict=True):
            comp = results[(job.key, 0)]
            evolved, why = (None, "teacher error") if comp.error else parse_evolved(
                comp.text, inst["text"], si)
            counts[f"evolve: {why}"] += 1
            if evolved is None:
                nxt.append(inst)
                continue
            child = inst | {"instruction_id": f"{inst['instruction_id'].split('.')[0]}.e{e}",
                            "text": evolved, "evolve_round": e,
                            "evolve_method": evolve_method(cfg, inst["instruction_id"], e),
                            "parent": inst["text"]}
            nxt.append(child)
            if si.evolve_keep_original:
                answered.append(child)
        current = nxt
    return answered if si.evolve_keep_original else current


def answer_row(cfg: PipelineConfig, inst: dict[str, Any], job: Job, sample: int,
               comp: Completion) -> GenerationRow:
    """The row of one answer: the instruction is the question (no gold), the student sees it
    bare, and the whole visible reply is the rationale (there is no final answer to extract)."""
    think, visible = split_think(comp.text or "")
    return make_generation_row(
        seed_id=inst["instruction_id"], sample=sample, question=inst["text"], gold=None,
        messages=student_messages(cfg, inst["text"]), teacher=teacher_name(cfg),
        completion=comp, price_in=cfg.teacher.price_in_per_mtok,
        price_out=cfg.teacher.price_out_per_mtok,
        parsed={"reasoning": comp.reasoning or think, "rationale": visible.strip() or None,
                "answer": None},
        teacher_prompt=job.messages[-1]["content"], proposal_round=inst["proposal_round"],
        evolve_round=inst["evolve_round"], evolve_method=inst["evolve_method"],
        parent_instruction=inst["parent"])


def generate_instructions(cfg: PipelineConfig, run_dir: RunDir
                          ) -> tuple[list[GenerationRow], dict[str, Any]]:
    """The instruct generate stage: (generation rows, stats for the manifest)."""
    si = self_instruct(cfg)
    tasks = load_seed_tasks(cfg)
    counts: Counter[str] = Counter()
    with ResponseCache(run_dir.cache) as cache:
        calls = _Calls(cfg, run_dir, cache)
        pool, rounds = _propose(cfg, calls, tasks, counts)
        final = _evolve(cfg, calls, pool, counts) if si.evolve_rounds else pool
        jobs = answer_jobs(cfg, final)
        results = calls.run("answer", jobs, "instruct: answer",
                            need_logprobs=bool(soft_targets.kd_needs_stored(cfg)))
    rows = [answer_row(cfg, inst, job, s, results[(job.key, s)])
            for inst, job in zip(final, jobs, strict=True) for s in job.samples]
    soft_targets.enforce(cfg, rows)
    steps = {k: v.as_dict() for k, v in calls.steps.items()}
    stats: dict[str, Any] = {
        "seed_tasks": len(tasks), "instructions": len(final), "proposal_rounds": rounds,
        "instruction_funnel": dict(sorted(counts.items())),
        "teacher_calls": steps,
        # cost_usd (set by the stage) sums the answer rows; proposing and evolving cost this:
        "instruction_cost_usd": round(calls.cost["propose"] + calls.cost["evolve"], 6),
        "total_cost_usd": round(sum(calls.cost.values()), 6),
        "spent_this_run_usd": round(sum(v.cost_usd for v in calls.steps.values()), 6),
        "budget_stopped": calls.budget_stopped,
    }
    if len(pool) < si.num_instructions:
        stats["note"] = (f"only {len(pool)} of {si.num_instructions} novel instructions after "
                         f"{rounds} rounds (raise max_rounds or novelty_threshold)")
    return rows, stats | soft_targets.manifest_note(cfg, rows) | batching.stats(calls.teacher)
