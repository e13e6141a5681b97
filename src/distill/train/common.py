"""What the SFT, KD and GKD trainers share: their arguments, LoRA, the local teacher, the loss
history and the one way a trained student is saved.

Every method goes through `save_student`, so a student directory loads the same way whichever
trained it, and under `accelerate launch` no process returns before the student is on disk.

Heavy libraries (torch, transformers, peft) are imported where they are used: the generate
stage imports `local_teacher_name` from here without wanting them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.chat_template import ensure_chat_template
from distill.config import ConfigError, PipelineConfig
from distill.records import atomic_path
from distill.train.memory import use_activation_checkpointing
from distill.train.precision import use_bf16
from distill.train.student import build_student

if TYPE_CHECKING:
    from distill.train.checkpoints import Checkpoints

# --- the training run ---------------------------------------------------------------------------


def training_kwargs(cfg: PipelineConfig, output_dir: str, model: Any = None,
                    checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """TrainingArguments fields every method sets the same way: one schedule for all students.

    SFT passes them to TRL's SFTConfig, KD to transformers' TrainingArguments, GKD to TRL's
    GKDConfig, each adding its own fields. `model` (the student) sizes `gradient_checkpointing:
    auto`; `checkpoints` sets the output dir and the save cadence (default: no checkpoints)."""
    import torch

    t = cfg.train
    kwargs = dict(
        output_dir=output_dir, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        logging_steps=t.logging_steps, save_strategy="no", report_to="none",
        seed=t.seed if t.seed is not None else cfg.seed, bf16=use_bf16(cfg),
        # the new name of gradient_checkpointing
        activation_checkpointing=use_activation_checkpointing(cfg, model),
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
    )
    return kwargs | (checkpoints.trainer_kwargs() if checkpoints is not None else {})


def lora_config(cfg: PipelineConfig) -> Any:
    """PEFT's LoraConfig for `train.lora`, or None (full fine-tuning)."""
    if cfg.train.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.train.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=lo.target_modules, task_type="CAUSAL_LM")


def fit(trainer: Any, checkpoints: Checkpoints | None = None) -> tuple[Any, float]:
    """Run the trainer with distill's progress lines, resuming from the job's last checkpoint
    when there is one; (its TrainOutput, training seconds, those before a resume included)."""
    from distill.train.checkpoints import CheckpointExtras, GracefulInterrupt
    from distill.train.progress import quiet_trainer

    if checkpoints is None:
        t0 = time.perf_counter()
        result = quiet_trainer(trainer).train()
        return result, round(time.perf_counter() - t0, 2)
    resume = checkpoints.resume_from()
    interrupt = GracefulInterrupt(checkpoints.label, checkpoints.enabled)
    extras = CheckpointExtras(trainer, checkpoints.cfg.train.save_minutes
                              if checkpoints.enabled else None, interrupt, checkpoints.enabled)
    trainer.add_callback(extras)
    if resume is not None:
        extras.restore(resume)
        checkpoints.resumed_step = extras.resumed_from
    with interrupt:  # Ctrl-C: a checkpoint at the end of the step, then KeyboardInterrupt
        result = quiet_trainer(trainer).train(resume_from_checkpoint=resume)
    return result, round(extras.train_seconds(), 2)


def history(trainer: Any, result: Any = None, parts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The loss log: the last logged loss (falling back to the run's mean when nothing was
    logged), the loss per logged step and, for each name in `parts`, its last logged value."""
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    fallback = getattr(result, "training_loss", None)
    return ({"final_loss": last.get("loss", fallback)}
            | {f"final_{p}": last.get(p) for p in parts}
            | {"loss_history": [(h["step"], h["loss"]) for h in logs]})


# --- the local teacher --------------------------------------------------------------------------


def local_teacher_name(cfg: PipelineConfig) -> str | None:
    """The teacher model to run in-process (on-the-fly logits, hidden states, GKD), if any."""
    name = cfg.train.kd.teacher_model
    if name is None and cfg.teacher.backend in ("transformers", "vllm") and cfg.teacher.model:
        name = cfg.teacher.model
    if not name:
        return None
    return str(cfg.resolve(name)) if cfg.resolve(name).exists() else name


def load_teacher(cfg: PipelineConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of the local teacher, frozen, in eval mode."""
    from distill.teachers.transformers_backend import load_causal_lm

    name = local_teacher_name(cfg)
    if name is None:
        raise ConfigError("train.kd: this needs a local teacher; set train.kd.teacher_model or "
                          "use teacher.backend: transformers")
    model, tok = load_causal_lm(name, trust_remote_code=cfg.teacher.trust_remote_code,
                                allow_pickle=cfg.teacher.allow_pickle,
                                dtype=cfg.teacher.dtype, device="cpu")
    model.requires_grad_(False)
    return model, tok


def load_teacher_tokenizer(cfg: PipelineConfig) -> Any | None:
    """The local teacher's tokenizer when it can be loaded (offline), else None."""
    from transformers import AutoTokenizer

    name = local_teacher_name(cfg)
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.teacher.trust_remote_code)
    except (OSError, ValueError):
        return None


def check_vocab(student_tok: Any, teacher_tok: Any, teacher_name: str) -> None:
    """Every teacher token must be the same id in the student's vocabulary (equal, or the student
    extends the teacher's with tokens of its own)."""
    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    differ = [t for t, i in teacher_vocab.items() if student_vocab.get(t) != i]
    if differ:
        raise ConfigError(
            f"train.method kd: teacher and student vocabularies differ: the teacher's "
            f"({teacher_name}, {len(teacher_vocab)} tokens) and the student's "
            f"({len(student_vocab)}) disagree on {len(differ)} tokens (e.g. {differ[0]!r}). "
            "This compares the two distributions token by token and needs one vocabulary: give "
            "the student the teacher's tokenizer (train.tokenizer), or use train.method: kd "
            "(train.kd.cross_tokenizer aligns different tokenizers) or sft")


# --- saving the student -------------------------------------------------------------------------


def model_card(cfg: PipelineConfig, info: dict[str, Any]) -> str:
    """The student's README.md: what it was trained from, on what, for how long."""
    model_type = (cfg.train.student_config or {}).get("model_type")
    base = cfg.train.student or f"fresh {model_type} (from config)"
    return (
        f"---\nlibrary_name: transformers\ntags: [distill, sft]\n---\n\n"
        f"# {cfg.name} — {info['label']}\n\n"
        f"Trained by `distill` ({cfg.train.method}) from `{base}` on {info['train_rows']} rows "
        f"of the pipeline's curated set, {info['steps']} optimizer steps "
        f"in {info['train_s']} s.\n\n"
        f"- parameters: {info['params']:,}\n- LoRA: {info['lora']}\n"
        f"- final training loss: {info['final_loss']}\n"
    )


def restore_inference_config(model: Any) -> None:
    """Undo what training set for itself: transformers' Trainer writes `args.use_cache` (False)
    into the model config, and a student saved that way generates without a KV cache."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.use_cache = True
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.use_cache = True


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    """The tokenizer with the chat template the student was trained on (the default one for a
    base tokenizer), so evaluate, export and `distill chat` render prompts exactly as training."""
    ensure_chat_template(tok)
    tok.save_pretrained(out_dir)


def save_student(trainer: Any, tok: Any, out_dir: Path, cfg: PipelineConfig, card: str) -> None:
    """Merged weights in `out_dir` (the LoRA adapter in `out_dir/adapter/`), atomically.

    Under `accelerate launch` the main process writes; FSDP-sharded weights are gathered first (a
    collective: every process makes the call). Every process then waits for the main one, so
    none returns, and goes on to read `out_dir` (the next stage, the next student), before the
    student is there."""
    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if acc.is_main_process:
        _write_student(trainer.model, state, tok, out_dir, cfg, card)
    acc.wait_for_everyone()


def _write_student(model: Any, state: dict[str, Any] | None, tok: Any, out_dir: Path,
                   cfg: PipelineConfig, card: str) -> None:
    with atomic_path(out_dir) as tmp:
        final = model
        if cfg.train.lora is not None:
            final.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=state)
            if state is not None:  # sharded in memory: merge into a fresh base copy
                from peft import PeftModel

                final = PeftModel.from_pretrained(build_student(cfg, tok), tmp / "adapter")
                state = None
            final = final.merge_and_unload()
        restore_inference_config(final)
        final.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        save_tokenizer(tok, tmp)
        (tmp / "README.md").write_text(card)
