"""`distill init`: a commented starter pipeline, example data, and (optionally) the templates."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from distill.config import ConfigError
from distill.prompts import BUILTIN, builtin_template
from distill.recipes import EXAMPLE_EVAL, EXAMPLE_SEEDS, EXAMPLE_TASKS, RECIPES, recipe_text


def init_project(directory: Path, recipe: str = "cot", *, prompts: bool = False,
                 force: bool = False) -> list[Path]:
    """Write `directory/pipeline.yaml` from `recipe` and the example data files it names (only
    those that do not exist). Returns the paths written, the pipeline first."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe}: unknown recipe (one of {', '.join(RECIPES)})")
    pipeline = directory / "pipeline.yaml"
    if pipeline.exists() and not force:
        raise ConfigError(f"{pipeline}: exists (use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    text = recipe_text(recipe)
    written = [pipeline]
    if prompts:
        (directory / "prompts").mkdir(exist_ok=True)
        for name in BUILTIN:
            src = builtin_template(name)
            assert src is not None
            dst = directory / "prompts" / src.name
            if not dst.exists():
                shutil.copyfile(src, dst)
                written.append(dst)
        # Point the pipeline at the copies, so edits take effect.
        text = re.sub(r"^(\s*(?:prompt|answer_prompt|evolve_prompt): )(" + "|".join(BUILTIN)
                      + r")\b", r"\1prompts/\2.j2", text, flags=re.M)
        text = text.replace("# built-in template; or a .j2 file beside this pipeline",
                            "# your copy of the built-in template")
    pipeline.write_text(text)
    data = {"data/seeds.jsonl": EXAMPLE_SEEDS, "data/eval.jsonl": EXAMPLE_EVAL,
            "data/seed_tasks.jsonl": EXAMPLE_TASKS}
    for rel, rows in data.items():
        path = directory / rel
        if rel in text and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            written.append(path)
    return written
