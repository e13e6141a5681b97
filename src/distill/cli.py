"""`distill` command line: the Python API with a YAML front.

Exit codes: 0 success, 1 a failed run, 2 bad input (config, data, template) with one line on
stderr naming the file and field. A full disk is 1 and a damaged run-directory file (cache,
manifest, rows) is 2, each one line naming the file and what to do (`distill.damage`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from distill.config import ConfigError, PipelineConfig
from distill.damage import disk_full
from distill.records import RunDir
from distill.stages import NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill a teacher LLM's reasoning into a small edge student.")
err_console = Console(stderr=True)
out = Console()

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: key.path=value")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Default: runs/<name>")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Validate, render one prompt, estimate "
                                      "requests/tokens/cost; call no teacher")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun finished stages too")]


def _fail(code: int, message: str) -> None:
    from rich.markup import escape

    # Escaped: a message such as "pip install 'distill[eval]'" must print its brackets.
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _dry_run(cfg: PipelineConfig) -> None:
    from distill.generate.cot import build_jobs
    from distill.seeds import load_seeds
    from distill.teachers.estimate import estimate

    if cfg.generate.source:
        out.print(f"generate: importing {cfg.generate.source}; no teacher calls")
        return
    if cfg.generate.task == "instruct":
        from distill.generate.instruct import dry_run_jobs

        jobs = dry_run_jobs(cfg)
    else:
        seeds = load_seeds(cfg)
        jobs = build_jobs(cfg, seeds, samples=(cfg.generate.adaptive.max_samples
                                               if cfg.generate.adaptive else None))
    if jobs:
        out.rule("first prompt")
        for m in jobs[0].messages:
            out.print(f"[bold]{m['role']}[/bold]: {m['content']}", highlight=False)
        out.rule()
    est = estimate(cfg.teacher, jobs)
    table = Table(title=f"dry run: {cfg.name} (no teacher called)")
    table.add_column("item")
    table.add_column("estimate", justify="right")
    for k, v in est.items():
        text = (("yes" if v else "no") if isinstance(v, bool) else f"{v:,.4f}"
                if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        table.add_row(k, text)
    out.print(table)


SUMMARY_KEYS = ("rows", "kept", "sft_rows", "cost_usd", "soft_targets", "teacher_accuracy",
                "student_accuracy", "label_only_accuracy", "base_student_accuracy",
                "kd_accuracy", "student_to_teacher_ratio", "compression_ratio",
                "formats", "smallest_format", "smallest_ratio_vs_teacher")


def stage_results(name: str, entry: dict[str, Any]) -> str:
    """One line of a stage's key results for the summary table."""
    parts = [f"{k}={entry[k]}" for k in SUMMARY_KEYS if entry.get(k) is not None]
    if name == "train":
        if entry.get("method"):
            parts.insert(0, f"method={entry['method']}")
        for student, info in (entry.get("students") or {}).items():
            loss = info.get("final_loss")
            bits = [f"{info['steps']} steps" if info.get("steps") is not None else "",
                    f"loss {loss:.4g}" if isinstance(loss, int | float) else "",
                    f"{info['train_s']:.0f} s" if info.get("train_s") is not None else ""]
            parts.append(f"{student}: {', '.join(b for b in bits if b)}")
    if name == "export":
        if entry.get("smallest_bytes"):
            parts.append(f"smallest_mb={entry['smallest_bytes'] / 1e6:.1f}")
        parts += [f"{k}={v}" for k, v in entry.items()
                  if k.endswith("_accuracy") and k not in SUMMARY_KEYS and v is not None]
    return ", ".join(parts)


def _summary(manifest: dict[str, Any], run: RunDir) -> None:
    table = Table(title=f"distill: {run.root}")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("key results")
    for name, e in manifest["stages"].items():
        table.add_row(name, str(e.get("status")), str(e.get("seconds", "-")),
                      stage_results(name, e))
    out.print(table)
    out.print(f"report: {run.report}")


def _execute(pipeline: Path, overrides: list[str] | None, run_dir: Path | None, dry_run: bool,
             stages: list[str] | None, force: bool) -> None:
    from distill.api import Pipeline

    root = run_dir or Path("runs")  # where a write failed, when the error names no file
    try:
        p = Pipeline.from_yaml(pipeline, overrides, run_dir)
        root = p.run_dir.root
        cfg, run = p.config, p.run_dir
        if dry_run:
            _dry_run(cfg)
            return
        manifest = p.run(stages=stages, force=force)
    except ConfigError as err:
        _fail(2, str(err))
    except KeyboardInterrupt:
        _fail(1, "interrupted; rerun the same command to resume (finished work is cached)")
    except Exception as err:  # noqa: BLE001 - a failed run: one line, exit 1, details if asked
        if os.environ.get("DISTILL_DEBUG"):
            raise
        full = disk_full(err, root)
        _fail(1, str(full) if full else
              f"{type(err).__name__}: {err} (set DISTILL_DEBUG=1 for the traceback)")
    else:
        _summary(manifest, run)


@app.command()
def run(pipeline: Path, run_dir: RunDirOpt = None, set_: SetOpt = None, dry_run: DryOpt = False,
        force: ForceOpt = False) -> None:
    """Run every stage of PIPELINE (skipping finished, unchanged ones)."""
    _execute(pipeline, set_, run_dir, dry_run, None, force)


def _stage_command(stage: str) -> None:
    def command(pipeline: Path, run_dir: RunDirOpt = None, set_: SetOpt = None,
                dry_run: DryOpt = False) -> None:
        _execute(pipeline, set_, run_dir, dry_run, [stage], True)

    command.__doc__ = f"Run only the {stage} stage (on whatever the previous stage's output holds)."
    app.command(name=stage)(command)


for _stage in NAMES:  # one command per stage of the table, in order
    _stage_command(_stage)


@app.callback()
def _global(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show third-party "
                                                  "progress bars and logs too")] = False
            ) -> None:
    import os

    from distill.quiet import quiet_third_party

    if verbose:
        os.environ["DISTILL_VERBOSE"] = "1"
    else:
        quiet_third_party()


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Where to write (created if needed)")]
         = Path("."),
         recipe: Annotated[str, typer.Option("--recipe", help="cot | cot-local | instruct")]
         = "cot",
         prompts: Annotated[bool, typer.Option("--prompts", help="Also copy the built-in "
                                               "templates into DIRECTORY/prompts to edit")]
         = False,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing "
                                             "pipeline.yaml")] = False) -> None:
    """Write a commented starter pipeline (and example data) into DIRECTORY."""
    from distill.init import init_project

    try:
        written = init_project(directory, recipe, prompts=prompts, force=force)
    except ConfigError as err:
        _fail(2, str(err))
    for path in written:
        out.print(f"wrote {path}", highlight=False)
    out.print(f"next: distill run {written[0]} --dry-run", highlight=False)


@app.command()
def report(run_dir: Path) -> None:
    """Re-render report.md and its plots from RUN_DIR."""
    from distill.evaluate.report import write_report

    if not (run_dir / "manifest.json").exists():
        _fail(2, f"{run_dir}: not a run directory (no manifest.json)")
    try:
        out.print(f"report: {write_report(RunDir(run_dir))}")
    except ConfigError as err:  # a damaged manifest
        _fail(2, str(err))
    except OSError as err:
        full = disk_full(err, run_dir)
        if full is None:
            raise
        _fail(1, str(full))


@app.command()
def chat(run_dir: Path,
         format_: Annotated[str, typer.Option("--format", help="merged | int8 | int4 | onnx | "
                                              "gguf")] = "merged",
         prompt: Annotated[str | None, typer.Option("--prompt", help="Answer this one question "
                                                    "and exit")] = None,
         max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 256,
         raw: Annotated[bool, typer.Option("--raw", help="Send the text without the run's "
                                           "prompt template")] = False) -> None:
    """Talk to an exported artifact of RUN_DIR: one answer with --prompt, else one per stdin
    line until EOF."""
    from distill.export.chat import chat_session

    try:
        chat_session(run_dir, format_, prompt, sys.stdin, lambda t: out.print(t, highlight=False,
                                                                               markup=False),
                     max_tokens=max_tokens, raw=raw)
    except ConfigError as err:
        _fail(2, str(err))


@app.command()
def push(run_dir: Path, repo_id: str,
         private: Annotated[bool, typer.Option("--private", help="Create the repo private")]
         = False) -> None:
    """Upload RUN_DIR/sft (training set, its formats, dataset card) to the Hub as dataset REPO_ID.

    The token comes from the HF_TOKEN environment variable.
    """
    from distill.hub import push_sft

    try:
        pushed = push_sft(run_dir, repo_id, private=private)
    except ConfigError as err:
        _fail(2, str(err))
    except Exception as err:  # noqa: BLE001 - network/auth failures: one line, exit 1
        _fail(1, f"push failed: {type(err).__name__}: {err}")
    else:
        out.print(f"pushed {pushed['rows']} rows ({', '.join(pushed['files'])}) to "
                  f"{pushed['url']}", highlight=False)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        # Click reports usage errors with exit 2 already; keep that contract.
        sys.exit(e.code)


if __name__ == "__main__":
    main()
