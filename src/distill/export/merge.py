"""`merged`: the LoRA adapter folded into the base weights, saved as a plain transformers model.

Training already saves a merged copy beside the adapter (`student/` + `student/adapter/`). When the
adapter's base model can be loaded we merge again with PEFT's `merge_and_unload` — the reference
path — and record how far it is from the trained copy; otherwise (a fresh student built from a
config has no base on disk) we copy the trained merged model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distill.config import ConfigError
from distill.export.runtime import Runner, load_tokenizer_dir, require_model_dir, stop_ids

# Files of a transformers model directory that travel with every export format.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
              "merges.txt", "added_tokens.json")


def copy_side_files(src: Path, dst: Path, *, config: bool = True) -> None:
    """Tokenizer, chat template and configs (not the weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file() and (config or name not in ("config.json",)):
            shutil.copy2(src / name, dst / name)


def load_torch_model(path: Path, what: str = "model") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    require_model_dir(path, what)
    try:
        # Safetensors only and never a model's own code (docs/security.md): export loads the
        # run's own outputs and the student's base, whose architecture training already loaded.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     use_safetensors=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - a model that will not load is a broken artifact
        raise ConfigError(f"{path}: cannot load {what} ({type(err).__name__}: {err})") from None
    return model.eval()


def _adapter_base(adapter_dir: Path, fallback: str | None) -> str | None:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        return None
    base = json.loads(cfg_path.read_text()).get("base_model_name_or_path") or fallback
    return str(base) if base else None


def export_merged(student_dir: Path, out_dir: Path, *, base_model: str | None = None,
                  model: Any = None) -> dict[str, Any]:
    """Write `out_dir` (model.safetensors + tokenizer + chat template). Returns notes.

    `model` is an already prepared model (e.g. pruned) to save instead of the student.
    """
    require_model_dir(student_dir, "student")
    notes: list[str] = []
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if model is not None:
        model.save_pretrained(out_dir, safe_serialization=True)
        copy_side_files(student_dir, out_dir, config=False)
        return {"notes": notes, "method": "saved"}
    adapter = student_dir / "adapter"
    base = _adapter_base(adapter, base_model) if adapter.is_dir() else None
    if base is not None:
        merged, note = _peft_merge(base, adapter, student_dir)
        notes.append(note)
        if merged is not None:
            merged.save_pretrained(out_dir, safe_serialization=True)
            copy_side_files(student_dir, out_dir, config=False)
            return {"notes": notes, "method": "peft merge_and_unload"}
    elif adapter.is_dir():
        notes.append("adapter base not on disk (fresh student); copied the trained merged model")
    out_dir.mkdir(parents=True)
    for p in student_dir.iterdir():
        if p.is_file() and (p.suffix == ".safetensors" or p.name in SIDE_FILES
                            or p.name == "model.safetensors.index.json"):
            shutil.copy2(p, out_dir / p.name)
    return {"notes": notes, "method": "copy"}


def _peft_merge(base: str, adapter: Path, student_dir: Path) -> tuple[Any, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                          use_safetensors=True,
                                                          trust_remote_code=False)
        merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    except Exception as err:  # noqa: BLE001 - fall back to the trained merged copy
        return None, f"PEFT merge from {base} failed ({type(err).__name__}); copied the student"
    trained = load_torch_model(student_dir, "student").state_dict()
    diffs = [float((v - trained[k]).abs().max()) for k, v in merged.state_dict().items()
             if k in trained and v.shape == trained[k].shape]
    return merged.eval(), f"PEFT merge_and_unload of {base}: max |Δ| vs trained merge " \
                          f"{max(diffs, default=0.0):.2e}"


class TorchRunner(Runner):
    """A transformers causal LM (fp32 or quantized modules) with a DynamicCache."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], fmt: str = "merged",
                 threads: int | None = None) -> None:
        import inspect

        import torch

        super().__init__(tokenizer, eos_ids)
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.fmt = fmt
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache: Any = None

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def forward(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True,
                             **{self._cache_arg: self.cache})
        self.cache = getattr(out, "cache", None) or out.past_key_values
        return np.asarray(out.logits[0].float().numpy())


def load_merged_runner(path: Path, threads: int | None = None) -> TorchRunner:
    model = load_torch_model(path, "merged artifact")
    tok = load_tokenizer_dir(path)
    return TorchRunner(model, tok, stop_ids(tok, path), "merged", threads)
