"""Evaluate-stage figures on a real pretrained model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill.evaluate.stage import dir_bytes, dir_params


@pytest.mark.real
def test_student_size_ignores_the_adapter_kept_beside_it(real_model: Path, tmp_path: Path
                                                         ) -> None:
    """A merged LoRA student keeps its adapter in `adapter/`; its size is the merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    student = tmp_path / "student"
    shutil.copytree(real_model, student)
    model = AutoModelForCausalLM.from_pretrained(real_model)
    n_params = sum(p.numel() for p in model.parameters())  # before LoRA layers are added
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(student / "adapter", safe_serialization=True)
    assert (student / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    merged = (real_model / "model.safetensors").stat().st_size
    assert dir_bytes(student) == merged
    assert dir_params(student) == n_params
