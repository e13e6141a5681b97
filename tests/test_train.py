"""SFT: loss on the assistant turn only, LoRA via PEFT, safetensors out."""

from __future__ import annotations

from pathlib import Path

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
