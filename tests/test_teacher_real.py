"""The local transformers teacher on a real pretrained LM (SmolLM2-135M, BPE, pad == eos).

Batched generation must pad on the left whatever the tokenizer says: the training tokenizer the
evaluate stage hands over pads on the right, and a right-padded batch continues the short rows
after their padding (transformers warns "right-padding was detected"), so their text is garbage.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distill.config import TeacherConfig
from distill.teachers import make_teacher
from distill.teachers.base import Completion, Job, SamplingParams
from distill.teachers.engine import run_jobs

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

QUESTIONS = [
    "What is 2 + 3?",
    "Name a colour.",
    "A shop sells 12 pencils in a box. Tom buys 3 boxes and gives away 5 pencils. "
    "How many pencils does he have left? Explain your reasoning step by step.",
    "Write one sentence about the sea, the wind and a small boat sailing home at night.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, seed=0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: batch-1 decoding of a 135M model gains little from a second one, and
    on a busy 2-core runner two threads spin against each other (3-4x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_right_padded(model_dir: Path) -> tuple[Any, Any]:
    """Model and tokenizer as the training code loads them: the tokenizer's own padding side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tok


def complete(model: Any, tok: Any, jobs: list[Job], batch_size: int
             ) -> dict[tuple[str, int], Completion]:
    cfg = TeacherConfig(backend="transformers", model="real", batch_size=batch_size)
    results, _ = run_jobs(make_teacher(cfg, model=model, tokenizer=tok), jobs, None,
                          show_progress=False)
    return results


@pytest.mark.parametrize("which", ["real_model", "real_base_model"])
def test_batched_greedy_equals_one_prompt_at_a_time(which: str,
                                                    request: pytest.FixtureRequest) -> None:
    model, tok = load_right_padded(request.getfixturevalue(which))
    assert tok.padding_side == "right" and tok.pad_token_id == tok.eos_token_id
    jobs = [Job(key=f"q{i}", messages=[{"role": "user", "content": q}], params=GREEDY,
                samples=[0]) for i, q in enumerate(QUESTIONS)]
    batched = complete(model, tok, jobs, batch_size=len(jobs))
    alone = complete(model, tok, jobs, batch_size=1)
    assert tok.padding_side == "right"  # the caller's tokenizer is not changed
    lengths = {alone[(j.key, 0)].prompt_tokens for j in jobs}
    assert len(lengths) == len(jobs)  # the batch really needs padding
    for job in jobs:
        b, a = batched[(job.key, 0)], alone[(job.key, 0)]
        assert b.error is None and a.error is None
        assert a.completion_tokens > 0 and a.text
        assert (b.token_ids, b.text, b.finish_reason, b.prompt_tokens) == (
            a.token_ids, a.text, a.finish_reason, a.prompt_tokens), job.key
