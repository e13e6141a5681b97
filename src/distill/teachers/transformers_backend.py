"""Local `transformers` teacher: batched `generate` on CPU (the offline default) or one GPU."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from distill.chat_template import render_chat
from distill.config import ConfigError, TeacherConfig
from distill.teachers.base import BatchItem, Completion, Job, Result, SamplingParams, TopLogprobs

__all__ = ["TransformersTeacher", "load_causal_lm", "loading_errors", "render_chat",
           "weight_options"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files in pickle format: unpickling one can run arbitrary code (docs/security.md)."""
_SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")


def weight_options(name: str, *, field: str, allow_pickle: bool, trust_remote_code: bool
                   ) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for the model `name` (`field` names it in errors,
    e.g. "teacher.model"; its section holds `allow_pickle` and `trust_remote_code`).

    Safetensors only unless `allow_pickle`: transformers reads safetensors first but, when
    `use_safetensors` is None (its default), falls back to `pytorch_model.bin`, and a
    config.json `transformers_weights` entry names a weights file even past
    `use_safetensors=True`. A local directory whose weights would come from a pickle is
    refused here, before transformers opens it."""
    if not allow_pickle:
        check_no_pickle(name, field)
    return {"trust_remote_code": trust_remote_code,
            "use_safetensors": None if allow_pickle else True}


def _opt_in(field: str, key: str) -> str:
    return f"{field.rsplit('.', 1)[0]}.{key}"


def check_no_pickle(name: str, field: str) -> None:
    """ConfigError when loading the local directory `name` would unpickle its weights."""
    path = Path(name)
    if not path.is_dir():
        return  # a hub id: transformers refuses a .bin-only repo under use_safetensors=True
    opt_in = _opt_in(field, "allow_pickle")
    try:
        named = json.loads((path / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and not named.endswith(_SAFE_SUFFIXES):
        raise ConfigError(f"{field}: {name}: config.json names pickle weights "
                          f"(transformers_weights: {named}); loading a pickle can run code. "
                          f"Convert them to safetensors, or set {opt_in}: true")
    if any(p.name.endswith(_SAFE_SUFFIXES) for p in path.iterdir()):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise ConfigError(f"{field}: {name}: weights only in pickle format ({shown}); loading "
                          "a pickle can run code. Convert them to safetensors, or set "
                          f"{opt_in}: true")


@contextlib.contextmanager
def loading_errors(name: str, field: str) -> Iterator[None]:
    """transformers' refusals as one-line ConfigErrors naming the field that opts in: custom
    code with `trust_remote_code` off, no safetensors weights (a hub repo with `.bin` only)."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"{field}: {name}: the model ships its own code (auto_map) for an "
                          "architecture transformers does not know; it is not run unless "
                          f"{_opt_in(field, 'trust_remote_code')}: true") from None
    except OSError as err:
        if "safetensors" not in str(err) or "pytorch_model.bin" in str(err):
            raise
        raise ConfigError(f"{field}: {name}: no safetensors weights ({str(err).splitlines()[0]}"
                          f"); distill loads safetensors only unless "
                          f"{_opt_in(field, 'allow_pickle')}: true") from None


def load_causal_lm(name: str, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                   dtype: str = "auto", device: str = "auto", field: str = "teacher.model"
                   ) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory or hub id: safetensors only
    and no custom code unless `allow_pickle` / `trust_remote_code` (`weight_options`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_name(name)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    options = weight_options(name, field=field, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code)
    with loading_errors(name, field):
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        # Any: the auto class resolves the architecture at run time, and its decorated `.to`
        # does not type-check as a bound method.
        model: Any = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **options)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def check_model_name(name: str) -> None:
    if not name:
        raise ConfigError("teacher.model: empty; expected a model directory or hub id")
    path = Path(name)
    if (name.startswith((".", "/")) or path.exists()) and not (path / "config.json").exists():
        raise ConfigError(f"teacher.model: {name}: no config.json (not a model directory)")


class TransformersTeacher:
    backend = "transformers"

    def __init__(self, cfg: TeacherConfig, model: Any = None, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.model_name = cfg.model
        self.model = model
        self.tokenizer = tokenizer
        self._pool: Any = None

    @property
    def model_id(self) -> str:
        return self.model_name

    def _ensure_loaded(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_causal_lm(
                self.cfg.model, trust_remote_code=self.cfg.trust_remote_code,
                allow_pickle=self.cfg.allow_pickle, dtype=self.cfg.dtype, device=self.cfg.device,
            )

    async def stream(self, jobs: Sequence[Job]) -> AsyncIterator[Result]:
        by_params: dict[SamplingParams, list[BatchItem]] = defaultdict(list)
        for job in jobs:
            for s in job.samples:
                by_params[job.params].append((job, s))
        batches: list[list[BatchItem]] = []
        for items in by_params.values():
            # Sort by prompt length so a batch wastes little padding.
            items.sort(key=lambda it: len(str(it[0].messages)))
            bs = self.cfg.batch_size
            batches += [items[i : i + bs] for i in range(0, len(items), bs)]
        if self.cfg.workers > 1 and self.model is None:
            gen = self._stream_workers(batches)
        else:
            self._ensure_loaded()
            gen = self._stream_local(batches)
        async for out in gen:
            yield out

    async def _stream_local(self, batches: list[list[BatchItem]]) -> AsyncIterator[Result]:
        for batch in batches:
            try:
                outs = await asyncio.to_thread(self.generate_batch, batch)
            except Exception as err:  # noqa: BLE001 - a failed batch becomes error rows
                outs = _failed(batch, err)
            for (job, s), comp in zip(batch, outs, strict=True):
                yield job, s, comp

    async def _stream_workers(self, batches: list[list[BatchItem]]) -> AsyncIterator[Result]:
        """Batches spread over `workers` processes, two in flight per worker so none idles;
        results come back as batches finish. Each batch is seeded by its own first job, so the
        text does not depend on which worker ran it."""
        loop = asyncio.get_running_loop()
        pool = self._worker_pool()
        pending: dict[asyncio.Future[Any], list[BatchItem]] = {}
        todo = iter(batches)
        while True:
            for batch in itertools.islice(todo, 2 * self.cfg.workers - len(pending)):
                pending[loop.run_in_executor(pool, _worker_generate, batch)] = batch
            if not pending:
                break
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                batch = pending.pop(fut)
                try:
                    outs = fut.result()
                except BrokenProcessPool as err:
                    raise RuntimeError(f"teacher.workers: a worker process died ({err}); its "
                                       "error is printed above") from None
                except Exception as err:  # noqa: BLE001 - a failed batch becomes error rows
                    outs = _failed(batch, err)
                for (job, s), comp in zip(batch, outs, strict=True):
                    yield job, s, comp

    def _worker_pool(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            import torch

            check_model_name(self.cfg.model)
            threads = max(1, torch.get_num_threads() // self.cfg.workers)
            one = self.cfg.model_copy(update={"workers": 1})
            # spawn, not fork: a forked copy of a process that has run torch ops can deadlock in
            # its thread pool.
            self._pool = ProcessPoolExecutor(
                self.cfg.workers, mp_context=mp.get_context("spawn"),
                initializer=_worker_init, initargs=(one, threads))
        return self._pool

    def generate_batch(self, batch: Sequence[BatchItem]) -> list[Completion]:
        """One batched `generate` per sampling parameters in `batch` (one, from `stream`);
        loads the model on first use. Raises what the model raises."""
        self._ensure_loaded()
        by_params: dict[SamplingParams, list[int]] = defaultdict(list)
        for i, (job, _) in enumerate(batch):
            by_params[job.params].append(i)
        out: dict[int, Completion] = {}
        for params, idx in by_params.items():
            comps = self._generate([batch[i] for i in idx], params)
            out.update(zip(idx, comps, strict=True))
        return [out[i] for i in range(len(batch))]

    def _generate(self, batch: Sequence[BatchItem], params: SamplingParams) -> list[Completion]:
        import torch

        tok, model = self.tokenizer, self.model
        texts = [render_chat(tok, job.messages) for job, _ in batch]
        # Left padding whatever the tokenizer's own `padding_side` (a training tokenizer pads on
        # the right): every row must continue from its last prompt token. Per call, so a
        # tokenizer shared with the caller is never changed.
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        # Seed from the batch's first (key, sample): reruns of the same batch give the same text
        # (crc32, not hash(): str hashes change from one process to the next).
        first_job, first_sample = batch[0]
        key_hash = zlib.crc32(f"{first_job.key}|{first_sample}".encode()) % 1_000_003
        torch.manual_seed(params.seed * 1_000_003 + key_hash)
        sample = params.temperature > 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=sample,
                temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None,
                top_k=0 if sample else None,
                max_new_tokens=params.max_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                return_dict_in_generate=True,
                output_logits=params.top_logprobs > 0,
                cache_implementation=None if self.cfg.kv_cache == "dynamic" else "static",
            )
        latency = (time.perf_counter() - t0) / len(batch)
        prompt_len = enc["input_ids"].shape[1]
        gen = out.sequences[:, prompt_len:]
        eos_ids = set(_as_list(tok.eos_token_id)) | {tok.pad_token_id}
        if params.top_logprobs > 0:
            top_ids, top_vals = _topk(out.logits, params.top_logprobs)
        comps = []
        for i in range(len(batch)):
            ids = gen[i].tolist()
            n, finish = len(ids), "length"
            for j, t in enumerate(ids):
                if t in eos_ids:
                    n, finish = j, "stop"
                    break
            kept = ids[:n]
            comp = Completion(
                text=tok.decode(kept, skip_special_tokens=True).strip(),
                finish_reason=finish,
                prompt_tokens=int(enc["attention_mask"][i].sum()),
                completion_tokens=n,
                latency_s=latency,
                token_ids=kept,
            )
            if params.top_logprobs > 0:
                comp.top_logprobs = _row_topk(top_ids[i], top_vals[i], n)
            comps.append(comp)
        return comps

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _failed(batch: list[BatchItem], err: Exception) -> list[Completion]:
    return [Completion.failed("backend", f"{type(err).__name__}: {err}") for _ in batch]


_WORKER: TransformersTeacher | None = None


def _worker_init(cfg: TeacherConfig, threads: int) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = TransformersTeacher(cfg)
    _WORKER._ensure_loaded()


def _worker_generate(batch: list[BatchItem]) -> list[Completion]:
    assert _WORKER is not None, "worker process not initialised"
    return _WORKER.generate_batch(batch)


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _topk(logits: tuple[Any, ...], k: int) -> tuple[list[Any], list[Any]]:
    """Top-k token ids and logprobs of the teacher's *raw* distribution at every generated step
    of every row: `[rows][steps][k]` nested lists, from one batched log-softmax and top-k."""
    import torch

    # One step at a time: a [B, V] log-softmax, not [B, T, V] (GBs for a 150k vocabulary).
    tops = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in logits]
    vals = torch.stack([t.values for t in tops], dim=1)  # [B, T, k]
    idx = torch.stack([t.indices for t in tops], dim=1)
    return idx.tolist(), vals.tolist()


def _row_topk(ids: list[Any], vals: list[Any], n: int) -> TopLogprobs:
    return [[(i, round(v, 4)) for i, v in zip(ids[t], vals[t], strict=True)] for t in range(n)]
