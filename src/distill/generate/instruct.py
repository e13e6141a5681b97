"""Instruction-response data: self-instruct from seed tasks, optional evol-instruct, answers.

    seed tasks ──► propose (teacher lists new instructions from sampled examples) ──► parse
               ──► novelty filter (vs the whole pool) ──► evolve (rewrite harder, optional)
               ──► answer (teacher) ──► generation rows (question = instruction, gold None)

Proposal rounds repeat until `num_instructions` new instructions passed the novelty filter or
`max_rounds` ran out. Every teacher call goes through `engine.run_jobs` with the run's response
cache, and every prompt is a deterministic function of the pipeline seed and the cached replies
before it, so a rerun reproduces the same pool and sends nothing.

The rows keep the generation schema, so the judge and heuristics filters apply unchanged; the
student is trained on the bare instruction (`messages`), whatever the answer template adds.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError, PipelineConfig, SelfInstructConfig
from distill.filter.dedup import near_duplicate_pairs
from distill.filter.rows import normalize_text, words
from distill.generate import batching
from distill.generate.parse import split_think
from distill.generate.templates import chat_messages, render
from distill.records import RunDir, empty_generation
from distill.seeds import read_rows
from distill.teachers import make_teacher
from distill.teachers.base import Completion, Job, SamplingParams, completion_cost
from distill.teachers.cache import ResponseCache
from distill.teachers.engine import EngineStats, run_jobs

# Tasks a text-only student cannot do (self-instruct's filter, narrowed to unambiguous words).
BLOCKED_WORDS = frozenset({
    "image", "images", "picture", "pictures", "photo", "photos", "photograph", "video", "videos",
    "audio", "recording", "diagram", "flowchart", "draw", "drawing", "sketch", "screenshot",
})
# Labels a model puts before an item or a rewrite ("Task 3:", "**Instruction:**", ...).
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*|__)?\s*(?:new\s+|rewritten\s+|evolved\s+|the\s+)?"
    r"(?:#?\s*(?:task|instruction|prompt|question)\s*#?)\s*\d*\s*(?:\*\*|__)?\s*(?:[:.)]|\s-\s)\s*"
    r"(?:\*\*|__)?\s*", re.I)
_ITEM = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:(?:task|instruction|prompt|question)\s*)?"
    r"(?:\(?\d{1,3}[.):\]]|\d{1,3}\s*-\s)\s*(?:\*\*)?\s*(?=\S)", re.I)
_BULLET = re.compile(r"^\s*[-*•]\s+(?=\S)")
_OUTPUT = re.compile(r"^\s*(?:\*\*)?\s*(?:output|answer|response|solution)\s*(?:\*\*)?\s*:",
                     re.I | re.M)
_INPUT = re.compile(r"^\s*(?:\*\*)?\s*input\s*(?:\*\*)?\s*:\s*", re.I | re.M)
_CLOSER = re.compile(r"\n\s*\n\s*(?:i hope|hope th|let me know|feel free|note:|enjoy|happy to"
                     r"|these (?:tasks|instructions)|each (?:task|of these))", re.I)
_LEAKS = ("#given prompt#", "#rewritten prompt#", "#the given prompt#", "given instruction:",
          "rewritten instruction:", "method:")


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


# ---------------------------------------------------------------------------------- parsing


def _strip_markup(text: str) -> str:
    text = text.strip().strip("`").strip()
    text = re.sub(r"^(?:\*\*|__)(.+?)(?:\*\*|__)(?=\s|$)", r"\1", text, flags=re.S)
    text = text.replace("**", "")
    for _ in range(2):
        text = _LABEL.sub("", text, count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    if text[:1] in "“\"" and text[-1:] in "”\"":
        text = text[1:-1].strip()
    return text


def _clean_item(text: str) -> str:
    """One proposed task: drop any answer the model added, fold an `Input:` into the text."""
    m = _OUTPUT.search(text)
    if m and m.start() > 0:
        text = text[: m.start()]
    text = _INPUT.sub("\n", text)
    text = _strip_markup(text)
    lines = [ln.rstrip() for ln in text.splitlines()]
    return "\n".join(lines).strip()


def _from_json(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    items = []
    for x in data:
        if isinstance(x, str):
            items.append(x)
        elif isinstance(x, dict):
            inst = x.get("instruction") or x.get("task") or x.get("prompt")
            if isinstance(inst, str):
                extra = x.get("input")
                items.append(f"{inst}\n\n{extra}" if isinstance(extra, str) and extra else inst)
    return items


def parse_instructions(text: str | None) -> list[str]:
    """The instructions in a proposal reply: a numbered list ("1." "2)" "Task 3:" "**4.**"),
    bullets, or a JSON list; an item runs until the next marker, so multi-line inputs survive.
    A reply with no markers at all is split on blank lines. Preambles are dropped."""
    if not text:
        return []
    _, visible = split_think(text)
    items: list[str] = []
    current: list[str] | None = None
    for line in visible.splitlines():
        m = _ITEM.match(line) or _BULLET.match(line)
        if m:
            if current is not None:
                items.append("\n".join(current))
            current = [line[m.end() :]]
        elif current is not None:
            current.append(line)
    if current is not None:
        items.append("\n".join(current))
    if items:  # a closing remark after the list sticks to the last item: cut it off
        items[-1] = _CLOSER.split(items[-1], maxsplit=1)[0]
    if not items:
        items = _from_json(visible) or [p for p in re.split(r"\n\s*\n", visible) if p.strip()]
    out, seen = [], set()
    for item in items:
        clean = _clean_item(item)
        key = normalize_text(clean)
        if clean and key not in seen:
            seen.add(key)
            out.append(clean)
    return out


def instruction_problem(text: str, si: SelfInstructConfig) -> str | None:
    """Why a proposed instruction is unusable, or None."""
    toks = words(text)
    if len(toks) < si.min_words:
        return "too short"
    if len(toks) > si.max_words:
        return "too long"
    if not text[:1].isalnum() and text[:1] not in "\"'(¿¡":
        return "starts with punctuation"
    if text.rstrip().endswith(":") and "\n" not in text.strip():
        return "a heading, not a task"
    if BLOCKED_WORDS.intersection(toks):
        return "needs non-text modality"
    return None


def parse_evolved(text: str | None, parent: str, si: SelfInstructConfig) -> tuple[str | None, str]:
    """(the rewritten instruction, "ok") or (None, why the evolution failed)."""
    if not text:
        return None, "empty"
    _, visible = split_think(text)
    lines = visible.strip().splitlines()
    # "Here is the rewritten instruction:" on its own line before the rewrite.
    while lines and lines[0].rstrip().endswith(":") and len(lines) > 1 and len(
            words(lines[0])) <= 8:
        lines = lines[1:]
    evolved = _strip_markup("\n".join(lines))  # a leading "Rewritten instruction:" is fine
    if not evolved:
        return None, "empty"
    low = evolved.casefold()
    if any(leak in low for leak in _LEAKS):
        return None, "copied the rewrite instructions"
    if normalize_text(evolved) == normalize_text(parent):
        return None, "unchanged"
    if low.startswith(("sorry", "i'm sorry", "i am sorry", "i cannot", "i can't")):
        return None, "refusal"
    problem = instruction_problem(evolved, si.model_copy(update={"max_words": si.max_words * 2}))
    return (None, problem) if problem else (evolved, "ok")


# ---------------------------------------------------------------------------------- novelty


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence)."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


class NoveltyFilter:
    """The instruction pool, and whether a candidate is a near-duplicate of any member.

    minhash: filter.dedup's `near_duplicate_pairs` (MinHash LSH over word n-gram shingles, pairs
    whose Jaccard estimate reaches the threshold) over pool and candidates together; rouge_l: the
    ROUGE-L F1 of the word sequences against every member (self-instruct's rule).
    """

    def __init__(self, si: SelfInstructConfig, pool: Sequence[str] = ()) -> None:
        self.si = si
        self.pool: list[str] = [normalize_text(t) for t in pool]

    def check(self, candidates: Sequence[str]) -> list[tuple[bool, str | None]]:
        """(novel, the pool text it duplicates or None) for each candidate, in order; novel
        candidates join the pool, so later candidates are checked against them too."""
        texts = [normalize_text(t) for t in candidates]
        out: list[tuple[bool, str | None]] = []
        if self.si.novelty_metric == "rouge_l":
            pool_toks = [words(t) for t in self.pool]
            for t in texts:
                toks = words(t)
                hit = next((self.pool[k] for k, p in enumerate(pool_toks)
                            if rouge_l(toks, p) >= self.si.novelty_threshold), None)
                if hit is None:
                    pool_toks.append(toks)
                    self.pool.append(t)
                out.append((hit is None, hit))
            return out
        n_pool = len(self.pool)
        combined = [*self.pool, *texts]
        earlier: dict[int, list[int]] = defaultdict(list)
        if texts:
            pairs = near_duplicate_pairs(combined, self.si.novelty_threshold, self.si.num_perm,
                                         self.si.novelty_ngram)
            for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
                earlier[max(i, j)].append(min(i, j))
        member = [True] * n_pool + [False] * len(texts)
        for k, t in enumerate(texts):
            j = n_pool + k
            hit = next((combined[i] for i in sorted(earlier[j]) if member[i]), None)
            if hit is None and t in combined[:j] and member[combined.index(t)]:
                hit = t  # exact copies: also when too short for any shingle
            member[j] = hit is None
            if hit is None:
                self.pool.append(t)
            out.append((hit is None, hit))
        return out


# ---------------------------------------------------------------------------------- prompts


def _params(cfg: PipelineConfig, temperature: float, max_tokens: int) -> SamplingParams:
    g = cfg.generate
    return SamplingParams(temperature=temperature, top_p=g.top_p, max_tokens=max_tokens,
                          seed=g.seed if g.seed is not None else cfg.seed)


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
    g = cfg.generate
    params = _params(cfg, g.temperature, g.max_tokens)
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

    def __init__(self, cfg: PipelineConfig, run_dir: RunDir) -> None:
        self.cfg = cfg
        self.teacher = make_teacher(cfg.teacher, batch_record=batching.record_path(run_dir))
        self.cache = ResponseCache(run_dir.cache)
        self.steps: dict[str, EngineStats] = {}
        self.cost: defaultdict[str, float] = defaultdict(float)
        """What each step's completions cost, cached or not (the rows' cost_usd convention)."""

    def run(self, step: str, jobs: list[Job], description: str
            ) -> dict[tuple[str, int], Completion]:
        if not jobs:
            return {}
        results, stats = run_jobs(self.teacher, jobs, self.cache,
                                  price_in=self.cfg.teacher.price_in_per_mtok,
                                  price_out=self.cfg.teacher.price_out_per_mtok,
                                  description=description)
        total = self.steps.setdefault(step, EngineStats())
        for k in ("requested", "cached", "sent", "failed", "prompt_tokens", "completion_tokens"):
            setattr(total, k, getattr(total, k) + getattr(stats, k))
        total.cost_usd += stats.cost_usd
        total.budget_stopped |= stats.budget_stopped
        total.notes += stats.notes
        t = self.cfg.teacher
        self.cost[step] += sum(completion_cost(c, t.price_in_per_mtok, t.price_out_per_mtok)
                               for c in results.values())
        return results

    @property
    def budget_stopped(self) -> bool:
        return any(s.budget_stopped for s in self.steps.values())

    def close(self) -> None:
        self.cache.close()


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


def generate_instructions(cfg: PipelineConfig, run_dir: RunDir
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The instruct generate stage: (generation rows, stats for the manifest)."""
    si = self_instruct(cfg)
    tasks = load_seed_tasks(cfg)
    counts: Counter[str] = Counter()
    calls = _Calls(cfg, run_dir)
    try:
        pool, rounds = _propose(cfg, calls, tasks, counts)
        final = _evolve(cfg, calls, pool, counts) if si.evolve_rounds else pool
        jobs = answer_jobs(cfg, final)
        results = calls.run("answer", jobs, "instruct: answer")
    finally:
        calls.close()
    teacher = f"{cfg.teacher.backend}:{cfg.teacher.model}"
    rows = []
    for inst, job in zip(final, jobs, strict=True):
        for s in job.samples:
            comp = results[(job.key, s)]
            reasoning, visible = split_think(comp.text or "")
            row = empty_generation()
            row.update(
                id=f"{inst['instruction_id']}#{s}", seed_id=inst["instruction_id"], sample=s,
                question=inst["text"], gold=None,
                messages=student_messages(cfg, inst["text"]),
                response=comp.text if not comp.error else None,
                reasoning=(comp.reasoning or reasoning) if not comp.error else None,
                rationale=(visible.strip() or None) if not comp.error else None,
                answer=None, finish_reason=comp.finish_reason,
                prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                cost_usd=completion_cost(comp, cfg.teacher.price_in_per_mtok,
                                         cfg.teacher.price_out_per_mtok),
                latency_s=round(comp.latency_s, 4), teacher=teacher, error=comp.error,
                teacher_served=comp.extra.get("served_model"),
                teacher_prompt=job.messages[-1]["content"],
                proposal_round=inst["proposal_round"],
                evolve_round=inst["evolve_round"], evolve_method=inst["evolve_method"],
                parent_instruction=inst["parent"],
            )
            rows.append(row)
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
    return rows, stats
