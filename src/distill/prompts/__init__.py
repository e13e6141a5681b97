"""The built-in prompt templates, shipped inside the package (package data).

A template field of a pipeline file (`generate.prompt`, `filter.judge.prompt`,
`generate.self_instruct.prompt` / `answer_prompt` / `evolve_prompt`) takes either a path, which
resolves relative to the pipeline's project like every other path, or the name of one of these:

    cot            question -> step-by-step rationale ending "The answer is N."
    instruct       an instruction (and optional input) put to the teacher for its answer
    self_instruct  propose new instructions from examples (self-instruct)
    evolve         rewrite an instruction to be harder (evol-instruct)
    judge          LLM-as-judge rubric, a score out of 10

A file of the same name beside the pipeline wins over the built-in one. `distill init
--prompts` copies them out to edit.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN = ("cot", "instruct", "self_instruct", "evolve", "judge")


def builtin_template(name: str) -> Path | None:
    """The packaged template called `name` (`cot` or `cot.j2`), or None if there is none."""
    stem = name[:-3] if name.endswith(".j2") else name
    return HERE / f"{stem}.j2" if stem in BUILTIN else None
