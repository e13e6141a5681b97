"""SFT: loss on the assistant turn only, LoRA via PEFT, safetensors out."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset

from distill.config import load_config
from distill.train.sft import to_prompt_completion, train_sft


def _conversations() -> Dataset:
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"Tom has {i} apples. How many?"},
                      {"role": "assistant", "content": f"He has {i}. The answer is {i}."}]}
        for i in range(8)
    ])


def test_loss_mask_covers_the_assistant_turn_only(micro_pipeline: Path) -> None:
    from trl import SFTTrainer

    from distill.train.sft import sft_args
    from distill.train.student import build_student, load_tokenizer

    cfg = load_config(micro_pipeline, ["train.epochs=1"])
    tok = load_tokenizer(cfg)
    trainer = SFTTrainer(model=build_student(cfg, tok), args=sft_args(cfg, "/tmp/distill-mask"),
                         train_dataset=to_prompt_completion(_conversations()),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tok.decode(ids[labels != -100])
    masked = tok.decode(ids[(labels == -100) & (batch["attention_mask"][0] == 1)])
    assert "The answer is" in trained and "He has" in trained
    assert "Tom has" not in trained and "<|user|>" not in trained
    assert "Tom has" in masked and "How many?" in masked
    assert tok.eos_token in trained  # the student learns to stop


def test_lora_training_saves_adapter_and_merged_model(micro_pipeline: Path, tmp_path: Path
                                                      ) -> None:
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(micro_pipeline, ["train.lora.r=4", "train.lora.alpha=8",
                                       "train.epochs=1"])
    out = tmp_path / "student"
    info = train_sft(cfg, _conversations(), out)
    assert info["lora"] and info["steps"] == 2
    adapter = safetensors.torch.load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("lora_B" in k for k in adapter)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    assert sum(p.numel() for p in merged.parameters()) == info["params"]
    assert not any("lora" in n for n, _ in merged.named_parameters())


class _Stream(io.StringIO):
    """A log file: not a terminal."""

    def isatty(self) -> bool:
        return False


def _state(step: int, total: int = 10) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=total)


def test_progress_prints_lines_when_stderr_is_not_a_terminal() -> None:
    from distill.train.progress import RichProgressCallback

    out = _Stream()
    cb = RichProgressCallback("student", stream=out, every_s=0.0)
    assert cb.progress is None  # no rich bar: it would print nothing until the end
    cb.on_train_begin(None, _state(0), None)
    for step in range(1, 10):
        cb.on_step_end(None, _state(step), None)
        cb.on_log(None, _state(step), None, logs={"loss": 1.0 / step})
    cb.on_step_end(None, _state(10), None)
    cb.on_log(None, _state(10), None, logs={"loss": 0.05})
    cb.on_train_end(None, _state(10), None)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train student: step 0/10 (0%)")
    assert "step 5/10 (50%)" in lines[5] and "loss 0.2500" in lines[5] and "ETA" in lines[5]
    assert "s/step" in lines[5] or "steps/s" in lines[5]
    assert lines[-1].startswith("train student: step 10/10 (100%) · loss 0.0500")
    assert lines[-1].endswith("done") and len(lines) == 11


def test_progress_lines_are_spaced_by_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.train.progress import RichProgressCallback, progress_interval

    monkeypatch.setenv("DISTILL_PROGRESS_EVERY", "3600")
    assert progress_interval() == 3600.0
    out = _Stream()
    cb = RichProgressCallback("kd", stream=out)
    cb.on_train_begin(None, _state(0), None)
    for step in range(1, 11):
        cb.on_step_end(None, _state(step), None)
    cb.on_train_end(None, _state(10), None)
    assert len(out.getvalue().splitlines()) == 2  # the start and the end, nothing between
    monkeypatch.setenv("DISTILL_PROGRESS_EVERY", "often")
    assert progress_interval() == 30.0


def test_final_loss_is_known_when_logging_steps_exceed_the_run(micro_pipeline: Path,
                                                               tmp_path: Path) -> None:
    cfg = load_config(micro_pipeline, ["train.epochs=1", "train.logging_steps=100"])
    out = tmp_path / "student"
    info = train_sft(cfg, _conversations(), out)
    assert info["steps"] == 2 and isinstance(info["final_loss"], float)
    assert info["loss_history"][-1][0] == 2  # logged at the last step
    card = (out / "README.md").read_text()
    assert f"final training loss: {info['final_loss']}" in card and "None" not in card



def test_cpu_training_narrows_the_fused_head_tiles_without_changing_the_loss() -> None:
    """TRL's CPU fallback allocated several [tokens, 32768] fp32 tiles per backward (+2.4 GB at
    2,048 tokens); 4,096-column tiles give the same log-probs and gradients."""
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    from distill.train.memory import CPU_VOCAB_TILE, cpu_training_memory, return_freed_memory

    cpu_training_memory()
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == CPU_VOCAB_TILE == 4096
    assert return_freed_memory()  # glibc on Linux
    torch.manual_seed(0)
    w, targets = torch.randn(10_000, 16), torch.randint(0, 10_000, (32,))
    results = []
    for tile in (32768, CPU_VOCAB_TILE):
        h = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        lp = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, tile, None, 1.0,
                                          ("log_probs",))[0]
        lp.sum().backward()
        results.append((lp.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    h = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    exact = torch.log_softmax(h @ w.T, -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(results[1][0], exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_trainer_dicts_are_quiet_unless_verbose(micro_pipeline: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                verbose: str) -> None:
    """`disable_tqdm` makes the Trainer print raw `{'loss': ...}` dicts (PrinterCallback);
    they are gone unless `distill -v` (DISTILL_VERBOSE=1)."""
    from transformers.trainer_callback import PrinterCallback

    from distill.train.progress import quiet_trainer
    from distill.train.sft import make_sft_trainer
    from distill.train.student import build_student, load_tokenizer

    monkeypatch.setenv("DISTILL_VERBOSE", verbose)
    cfg = load_config(micro_pipeline, ["train.epochs=1"])
    tok = load_tokenizer(cfg)
    trainer = make_sft_trainer(cfg, tok, build_student(cfg, tok), _conversations(), tmp_path)
    has_printer = any(isinstance(cb, PrinterCallback)
                      for cb in trainer.callback_handler.callbacks)
    assert has_printer  # what transformers adds
    quiet_trainer(trainer)
    kept = any(isinstance(cb, PrinterCallback) for cb in trainer.callback_handler.callbacks)
    assert kept == (verbose == "1")
