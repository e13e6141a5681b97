"""Learning curves: greedy accuracy on a development set every `train.dev.every_steps` steps.

The curve answers "how many optimizer steps does this student need to reach accuracy X", which
compares training methods (SFT vs soft-target KD) at equal data. The dev set is never the held-out
evaluation set (an overlap is a config error), and dev questions that are in the training set
are dropped so the curve measures generalization, not recall: the same question, and for task
seeds the same arithmetic reworded (`shared_problems`).
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from distill.answers import score
from distill.config import ConfigError, PipelineConfig
from distill.generate.templates import chat_messages
from distill.teachers.base import Job, SamplingParams


def load_dev_items(cfg: PipelineConfig, train_questions: set[str]) -> list[dict[str, Any]]:
    """`train.dev` items minus training questions; an overlap with evaluate is an error."""
    from distill.seeds import load_eval_set, normalize, read_rows, task_rows

    d = cfg.train.dev
    assert d is not None
    if d.task is not None:
        raw = task_rows(d.task)
        rows = normalize(raw, question_field="question", answer_field="answer",
                         id_field="id", source=d.task.name, where="train.dev.task")
        for r, src in zip(rows, raw, strict=True):
            r["canonical"] = src.get("canonical")
    else:
        path = cfg.resolve(d.dataset or "")
        rows = normalize(read_rows(path, "train.dev.dataset"), question_field=d.question_field,
                         answer_field=d.answer_field, id_field=None, source=path.stem,
                         where=str(d.dataset))
    if cfg.evaluate is not None:
        held_out = {r["question"] for r in load_eval_set(cfg)}
        clash = [r for r in rows if r["question"] in held_out]
        if clash:
            raise ConfigError(f"train.dev: {len(clash)} dev questions are in the evaluate set "
                              f"(e.g. {clash[0]['question'][:60]!r}); a dev set must not be "
                              "the held-out set")
    rows = [r for r in rows if r["question"] not in train_questions and r.get("answer")]
    shared = shared_problems(cfg, train_questions)
    rows = [r for r in rows if r.get("canonical") not in shared]
    if not rows:
        raise ConfigError("train.dev: no dev item left (every one is in the training set or "
                          "has no answer)")
    return rows[: d.limit]


def shared_problems(cfg: PipelineConfig, train_questions: set[str]) -> set[str]:
    """Canonical forms (task rows' `canonical`: the arithmetic without names and item words) of
    the training problems, when the seeds come from a task. A dev problem with the same
    arithmetic as a training one, only reworded, would measure recall; the task's test split
    never shares arithmetic with its train split, so a dev set that does would read optimistic.
    """
    from distill.seeds import task_rows

    if cfg.seeds.task is None:
        return set()
    return {r["canonical"] for r in task_rows(cfg.seeds.task)
            if r.get("canonical") and r["question"] in train_questions}


def dev_accuracy(model: Any, tok: Any, cfg: PipelineConfig, items: list[dict[str, Any]]) -> float:
    """Greedy accuracy of `model` on `items`, prompted exactly as the evaluate stage prompts."""
    from distill.config import TeacherConfig
    from distill.teachers.transformers_backend import TransformersTeacher

    d = cfg.train.dev
    assert d is not None
    prompt = cfg.resolve(cfg.generate.prompt)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=d.max_tokens, seed=cfg.seed)
    jobs = [Job(key=it["id"], messages=chat_messages(prompt, cfg.generate.system_prompt,
                                                     question=it["question"]),
                params=params, samples=[0]) for it in items]
    tcfg = TeacherConfig(backend="transformers", model="dev", batch_size=d.batch_size)
    teacher = TransformersTeacher(tcfg, model=model, tokenizer=tok)
    import torch

    # The backend seeds torch's global RNG per batch; the Trainer's shuffling draws from that
    # RNG too, so scoring must leave it as it found it (a dev curve must not change training).
    rng_state = torch.get_rng_state()
    # Batched generation pads on the left per call (`TransformersTeacher.generate_batch` passes
    # padding_side="left"), so the training tokenizer, which pads on the right, is left alone.
    was_training = model.training
    model.eval()
    gold = {it["id"]: str(it["answer"]) for it in items}
    try:
        hits = 0
        for start in range(0, len(jobs), d.batch_size):
            batch = [(j, 0) for j in jobs[start : start + d.batch_size]]
            comps = teacher.generate_batch(batch)
            for (job, _), comp in zip(batch, comps, strict=True):
                hits += score(comp.text, gold[job.key], reasoning=comp.reasoning)
    finally:
        model.train(was_training)
        torch.set_rng_state(rng_state)
    return hits / len(items)


class DevCurveCallback(TrainerCallback):
    """Scores the model being trained at step 0, every `every_steps`, and at the last step."""

    def __init__(self, cfg: PipelineConfig, tok: Any, items: list[dict[str, Any]]) -> None:
        assert cfg.train.dev is not None
        self.cfg, self.tok, self.items = cfg, tok, items
        self.every = cfg.train.dev.every_steps
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0

    def _score(self, model: Any, step: int) -> None:
        if model is None or (self.curve and self.curve[-1][0] == step):
            return
        t0 = time.perf_counter()
        acc = dev_accuracy(model, self.tok, self.cfg, self.items)
        self.seconds += time.perf_counter() - t0
        self.curve.append((step, round(acc, 4)))

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kw: Any) -> None:
        self._score(model, state.global_step)  # 0, or the step a resumed run starts at

    def checkpoint_state(self) -> dict[str, Any]:
        """What a training checkpoint keeps of the curve (`distill.train.checkpoints`)."""
        return {"curve": [list(p) for p in self.curve], "seconds": self.seconds}

    def restore_checkpoint_state(self, data: dict[str, Any]) -> None:
        self.curve = [(int(s), float(a)) for s, a in data["curve"]]
        self.seconds = float(data["seconds"])

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kw: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._score(model, state.global_step)

    def info(self) -> dict[str, Any]:
        return {"dev_curve": [list(p) for p in self.curve], "dev_n": len(self.items),
                "dev_eval_s": round(self.seconds, 2)}


def steps_to_reach(curve: list[list[float]] | list[tuple[int, float]], level: float
                   ) -> int | None:
    """The first scored step whose dev accuracy is at least `level` (None: never)."""
    for step, acc in curve:
        if acc >= level:
            return int(step)
    return None
