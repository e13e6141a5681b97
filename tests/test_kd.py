"""Soft-target distillation: the loss by hand, top-k capture end to end, vocab checks, a KD run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from distill.config import ConfigError, PipelineConfig, load_config
from distill.records import RunDir
from distill.train.losses import Divergence
from tests.conftest import COT_TEMPLATE, MICRO_SEEDS, micro_solution
from tests.tiny import make_tokenizer

# --- the loss, by hand --------------------------------------------------------------------------


def _softmax(xs: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


STUDENT = [[[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.5]]]   # [B=1, C=2, V=4]
TEACHER = [[[2.0, 0.0, -1.0, 1.0], [-0.3, 0.8, 0.4, 0.0]]]
LABELS = [[3, 1]]


def _hand(alpha: float, t: float, kind: str = "forward_kl", beta: float = 0.5) -> float:
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(STUDENT[0], LABELS[0], strict=True)) / 2
    soft = 0.0
    for s, te in zip(STUDENT[0], TEACHER[0], strict=True):
        p, q = _softmax(te, t), _softmax(s, t)
        if kind == "forward_kl":
            soft += _kl(p, q)
        elif kind == "reverse_kl":
            soft += _kl(q, p)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
            soft += beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return alpha * ce + (1 - alpha) * t * t * soft / 2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_loss_equals_the_hand_computed_value(kind: Divergence) -> None:
    import torch

    from distill.train.losses import divergence_beta, kd_loss

    s, te, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    out = kd_loss(s, y, te, torch.ones(1, 2, dtype=torch.bool), alpha=0.3, temperature=2.0,
                  beta=divergence_beta(kind, 0.3))
    assert out.loss.item() == pytest.approx(_hand(0.3, 2.0, kind, beta=0.3), rel=1e-5)


def test_generalized_jsd_agrees_with_trl_gkd() -> None:
    import torch
    from trl.experimental.gkd import GKDTrainer

    from distill.train.losses import generalized_jsd

    torch.manual_seed(0)
    s, te = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    for beta in (0.0, 0.3, 1.0):
        ours = generalized_jsd(s, te, beta, temperature=1.5).mean()
        theirs = GKDTrainer.generalized_jsd_loss(s, te, beta=beta, temperature=1.5)
        assert ours.item() == pytest.approx(theirs.item() / 5, rel=1e-5)  # theirs: sum/batch


def test_alpha_and_temperature_act_as_the_formula_says() -> None:
    import torch

    from distill.train.losses import kd_loss

    s, te, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    mask = torch.ones(1, 2, dtype=torch.bool)

    def loss(alpha: float, t: float) -> float:
        return kd_loss(s, y, te, mask, alpha=alpha, temperature=t, beta=0.0).loss.item()

    ce = torch.nn.functional.cross_entropy(s[0], y[0]).item()
    assert loss(1.0, 2.0) == pytest.approx(ce, rel=1e-6)  # alpha = 1: pure CE, T irrelevant
    assert loss(1.0, 7.0) == pytest.approx(ce, rel=1e-6)
    for alpha in (0.0, 0.25, 0.8):  # linear in alpha between CE and T^2 * KL
        assert loss(alpha, 2.0) == pytest.approx(_hand(alpha, 2.0), rel=1e-5)
    # T^2 keeps the soft term's size: as T grows, T^2 KL_T → Var_uniform(teacher - student) / 2.
    diff = te - s
    limit = (diff - diff.mean(-1, keepdim=True)).pow(2).mean(-1).mean().item() / 2
    assert loss(0.0, 200.0) == pytest.approx(limit, rel=1e-2)
    assert loss(0.0, 1.0) != pytest.approx(loss(0.0, 2.0), rel=1e-2)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_targets_by_hand(kind: Divergence) -> None:
    """Stored top-k: the teacher renormalized over its k ids (no tail); the student's full
    distribution — forward KL and JSD are the exact full-vocabulary values against that teacher;
    reverse KL, infinite there, compares the two on the k ids."""
    import torch

    from distill.train.losses import divergence_beta, kd_loss

    ids = [[0, 3], [1, 2]]
    lps = [[-0.2, -1.9], [-0.5, -1.2]]   # raw teacher log-probs of those ids (sum of p < 1)
    t, beta = 2.0, 0.3
    out = kd_loss(torch.tensor(STUDENT), torch.tensor(LABELS), torch.tensor([lps]),
                  torch.ones(1, 2, dtype=torch.bool), alpha=0.0, temperature=t,
                  beta=divergence_beta(kind, beta), topk_ids=torch.tensor([ids]),
                  topk_valid=torch.ones(1, 2, 2, dtype=torch.bool))
    hand = 0.0
    for pos in range(2):
        p_k = _softmax(lps[pos], t)
        p = [p_k[ids[pos].index(v)] if v in ids[pos] else 0.0 for v in range(4)]
        q = _softmax(STUDENT[0][pos], t)
        if kind == "forward_kl":
            hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi)
        elif kind == "jsd":
            m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
            hand += beta * sum(a * math.log(a / c) for a, c in zip(p, m, strict=True) if a)
            hand += (1 - beta) * sum(b * math.log(b / c) for b, c in zip(q, m, strict=True))
        else:
            q_k = _softmax([STUDENT[0][pos][i] for i in ids[pos]], t)
            hand += _kl(q_k, p_k)
    assert out.loss.item() == pytest.approx(t * t * hand / 2, rel=1e-5)


# --- a project with a teacher that reports its top-k --------------------------------------------


@pytest.fixture(scope="module")
def kd_project(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path) -> Path:
    root = tmp_path_factory.mktemp("kd-project")
    for d in ("pipelines", "prompts", "data"):
        (root / d).mkdir()
    (root / "prompts" / "cot.j2").write_text(COT_TEMPLATE.read_text())
    (root / "data" / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in MICRO_SEEDS))
    (root / "pipelines" / "kd.yaml").write_text(f"""
name: kd
seeds: {{path: data/seeds.jsonl}}
teacher: {{backend: transformers, model: {tiny_teacher}, top_logprobs: 5, batch_size: 16}}
generate: {{prompt: prompts/cot.j2, samples_per_prompt: 3, temperature: 0.7, max_tokens: 48}}
filter: {{verify: {{}}, dedup: null}}
train:
  method: kd
  student_config: {{model_type: llama, hidden_size: 32, intermediate_size: 64,
                    num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4,
                    max_position_embeddings: 512, tie_word_embeddings: true}}
  tokenizer: {tiny_teacher}
  epochs: 1
  batch_size: 4
  learning_rate: 0.003
  max_length: 256
  logging_steps: 1
  kd: {{temperature: 2.0, alpha: 0.5}}
""")
    return root / "pipelines" / "kd.yaml"


@pytest.fixture(scope="module")
def kd_run(kd_project: Path) -> tuple[PipelineConfig, RunDir]:
    """generate (with top-k) → filter: a run directory whose sft set carries soft targets."""
    from distill.filter.stage import run as run_filter
    from distill.generate.stage import run as run_generate

    cfg = load_config(kd_project)
    run_dir = RunDir(kd_project.parent.parent / "run")
    run_generate(cfg, run_dir)
    run_filter(cfg, run_dir)
    return cfg, run_dir


def _sft(run_dir: RunDir) -> list[dict[str, Any]]:
    from distill.io import read_stage_rows

    return read_stage_rows(run_dir.stage("sft"), "sft.jsonl")


def _batch(rows: list[dict[str, Any]], tok: Any) -> dict[str, Any]:
    from distill.train.kd_data import KDCollator, TokenMapper, kd_examples

    examples, _ = kd_examples(rows, tok, max_length=256, mapper=TokenMapper(tok, len(tok)))
    return KDCollator(tok.pad_token_id)(examples)


def test_topk_capture_round_trips_through_the_stored_rows(kd_project: Path, tmp_path: Path
                                                          ) -> None:
    import torch

    from distill.generate.cot import build_jobs, generation_row
    from distill.io import read_stage_rows, write_stage
    from distill.teachers.transformers_backend import TransformersTeacher
    from distill.train.dataset import sft_rows
    from distill.train.student import load_tokenizer

    cfg = load_config(kd_project)
    teacher = TransformersTeacher(cfg.teacher)
    teacher._ensure_loaded()
    jobs = build_jobs(cfg, MICRO_SEEDS[:3], samples=1)
    comps = teacher.generate_batch([(j, 0) for j in jobs])
    rows = [generation_row(cfg, s, j, 0, c)
            for s, j, c in zip(MICRO_SEEDS[:3], jobs, comps, strict=True)]
    assert all(len(r["top_logprobs"]) == len(r["token_ids"]) > 0 for r in rows)
    write_stage(tmp_path / "generate", rows, "generations.jsonl")
    from_jsonl = read_stage_rows(tmp_path / "generate", "generations.jsonl")
    (tmp_path / "generate" / "generations.jsonl").unlink()
    from_dataset = read_stage_rows(tmp_path / "generate", "generations.jsonl")

    tok = load_tokenizer(cfg)
    live = _batch(sft_rows(rows), tok)
    for stored in (from_jsonl, from_dataset):
        again = _batch(sft_rows(stored), tok)
        assert live.keys() == again.keys()
        for k in live:
            assert torch.equal(live[k], again[k]), k

    # The stored targets sit at the right positions: a forward pass of the teacher over the
    # training sequence gives the same log-probabilities at the stored ids.
    model = teacher.model
    with torch.no_grad():
        logits = model(input_ids=live["input_ids"], attention_mask=live["attention_mask"]).logits
    lp = torch.log_softmax(logits.float(), -1)
    from distill.train.losses import gather_positions

    at_ids = gather_positions(lp, live["pos"]).gather(-1, live["topk_ids"])
    valid = live["topk_valid"]
    assert valid.sum() > 30
    assert torch.allclose(at_ids[valid], live["topk_logprobs"][valid], atol=2e-3)
    # ... and the hard labels are the teacher's sampled tokens, closed by EOS.
    first = live["labels"][0][live["labels"][0] != -100].tolist()
    assert first[:-1] == rows[0]["token_ids"] and first[-1] == tok.eos_token_id


def test_openai_token_strings_map_to_the_same_targets(kd_run: tuple[PipelineConfig, RunDir]
                                                      ) -> None:
    """An OpenAI-compatible server returns token strings and no ids: looked up in the student's
    vocabulary and aligned by re-tokenizing the response, they give the same tensors."""
    import torch

    from distill.train.student import load_tokenizer

    cfg, run_dir = kd_run
    tok = load_tokenizer(cfg)
    rows = _sft(run_dir)[:4]
    as_strings = [r | {"token_ids": None,
                       "top_logprobs": [[(tok.decode([t]), lp) for t, lp in step]
                                        for step in r["top_logprobs"]]} for r in rows]
    a, b = _batch(rows, tok), _batch(as_strings, tok)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vocabulary_mismatch_goes_cross_tokenizer_or_is_a_clear_config_error(
        kd_run: tuple[PipelineConfig, RunDir], tmp_path: Path) -> None:
    """A student with another vocabulary: `cross_tokenizer: auto` aligns instead of comparing
    ids (issue #21), with a local teacher's tokenizer or from an API teacher's token strings;
    the same-vocabulary path still refuses ids that do not spell the responses, and string top-k
    that spell nothing of the response are refused."""
    from distill.train.kd import _resolve_mode, train_kd
    from distill.train.kd_data import require_shared_vocabulary
    from distill.train.student import load_tokenizer

    cfg, run_dir = kd_run
    other = tmp_path / "other-tok"
    other_tok = make_tokenizer(other, ["completely different words here", "zebra quartz"] * 20)
    bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"tokenizer": str(other)})})
    tok = load_tokenizer(cfg)
    rows = _sft(run_dir)
    assert _resolve_mode(cfg, rows, tok, tok) == "exact"
    assert _resolve_mode(bad, rows, other_tok, tok) == "align"
    with pytest.raises(ConfigError, match="vocabularies"):  # what exact KD would do
        require_shared_vocabulary(bad, rows, other_tok, tok)
    as_strings = [r | {"token_ids": None,
                       "top_logprobs": [[(tok.decode([t]), lp) for t, lp in step]
                                        for step in r["top_logprobs"]]} for r in rows]
    assert _resolve_mode(bad, as_strings, other_tok, None) == "align"
    assert _resolve_mode(cfg, as_strings, tok, None) == "exact"
    unknown = [r | {"top_logprobs": [[("\u0444\u044b\u0432", lp) for _, lp in step]
                                     for step in r["top_logprobs"]]} for r in as_strings]
    api = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"backend": "openai", "model": "gpt-x"})})
    with pytest.raises(ConfigError, match="do not spell the response"):
        train_kd(api, None, unknown, tmp_path / "student")
    assert not (tmp_path / "student").exists()


def _kl_to_teacher(model: Any, teacher: Any, tok: Any) -> float:
    """Mean forward KL(teacher || student), T = 1, on held-out solutions (unseen numbers)."""
    import torch

    from distill.train.kd_data import KDCollator, kd_examples
    from distill.train.losses import gather_positions, generalized_jsd, masked_mean

    held_out = [{"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                 "answer": str(a + b)} for a, b in [(7, 2), (1, 5), (9, 0), (3, 3)]]
    rows = [{"messages": [{"role": "user",
                           "content": f"{s['question']}\nLet's think step by step."},
                          {"role": "assistant", "content": micro_solution(s)}]}
            for s in held_out]
    ex, _ = kd_examples(rows, tok, max_length=256)
    batch = KDCollator(tok.pad_token_id)(ex)
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    d = generalized_jsd(gather_positions(s, batch["pos"]), gather_positions(t, batch["pos"]), 0.0)
    return masked_mean(d, batch["labels"] != -100).item()


def test_short_kd_run_lowers_the_kl_to_the_teacher(kd_run: tuple[PipelineConfig, RunDir]
                                                   ) -> None:
    from transformers import AutoModelForCausalLM

    from distill.train.common import load_teacher
    from distill.train.kd import train_kd
    from distill.train.student import build_student, load_tokenizer

    cfg, run_dir = kd_run
    cfg = load_config(Path(cfg.root) / "pipelines" / "kd.yaml",
                      ["train.epochs=4", "train.learning_rate=0.01"])
    rows = _sft(run_dir)
    assert rows and all(r["top_logprobs"] for r in rows)
    out = run_dir.stage("student_kd_test")
    info = train_kd(cfg, run_dir, rows, out)
    assert info["soft_targets"] == "stored top-k" and info["top_k"] == 5
    assert info["rows_with_soft_targets"] == len(rows) and info["steps"] >= 4
    assert info["final_soft"] is not None and info["final_ce"] is not None

    tok = load_tokenizer(cfg)
    teacher, _ = load_teacher(cfg)
    before = _kl_to_teacher(build_student(cfg, tok), teacher, tok)
    after = _kl_to_teacher(AutoModelForCausalLM.from_pretrained(out), teacher, tok)
    assert after < 0.7 * before, (before, after)


def test_teacher_logits_hidden_states_and_gkd_train_and_save(
        kd_run: tuple[PipelineConfig, RunDir], tmp_path: Path) -> None:
    """Without stored top-k: full logits of the local teacher, plus the layer-wise loss; and the
    on-policy GKD student; both through the train stage's `train.also`."""
    from transformers import AutoModelForCausalLM

    from distill.train.stage import run as run_train

    cfg, run_dir = kd_run
    root = Path(cfg.root)
    cfg = load_config(root / "pipelines" / "kd.yaml", [
        "train.method=sft", "train.also=[kd, gkd]", "train.max_steps=2",
        "train.kd.soft_targets=teacher", "train.kd.hidden_weight=0.5",
        "train.kd.hidden_layers=[[1, 2], [0, 1]]", "train.kd.hidden_loss=cosine",
        "train.kd.lmbda=1.0", "train.kd.max_new_tokens=16", "train.lora.r=4"])
    result = run_train(cfg, run_dir)
    students = result["students"]
    assert set(students) == {"student", "kd", "gkd"}
    kd, gkd = students["kd"], students["gkd"]
    assert kd["dir"] == "student_kd" and gkd["dir"] == "student_gkd"
    assert kd["soft_targets"] == "teacher logits" and kd["steps"] == 2
    assert kd["hidden_layers"] == [[1, 2], [0, 1]]
    assert gkd["method"] == "gkd" and gkd["steps"] == 2 and gkd["final_loss"] is not None
    history = [h for h in json.loads(json.dumps(kd["loss_history"]))]
    assert history and all(math.isfinite(loss) for _, loss in history)
    for d in ("student_kd", "student_gkd"):
        model = AutoModelForCausalLM.from_pretrained(run_dir.root / d)
        assert sum(p.numel() for p in model.parameters()) == kd["params"]
        assert "soft targets" in (run_dir.root / d / "README.md").read_text()


def test_static_kv_cache_samples_the_same_tokens_and_soft_targets(kd_project: Path) -> None:
    from distill.generate.cot import build_jobs
    from distill.teachers.transformers_backend import TransformersTeacher

    cfg = load_config(kd_project)
    jobs = build_jobs(cfg, MICRO_SEEDS[:4], samples=1)
    outs = {}
    for cache in ("dynamic", "static"):
        teacher = TransformersTeacher(cfg.teacher.model_copy(update={"kv_cache": cache}))
        teacher._ensure_loaded()
        outs[cache] = teacher.generate_batch([(j, 0) for j in jobs])
    for a, b in zip(outs["dynamic"], outs["static"], strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.top_logprobs is not None and len(a.top_logprobs) == len(a.token_ids)
        for sa, sb in zip(a.top_logprobs, b.top_logprobs, strict=True):
            assert [i for i, _ in sa] == [i for i, _ in sb]
            assert [lp for _, lp in sa] == pytest.approx([lp for _, lp in sb], abs=1e-3)


def test_bucketed_batches_cover_every_example_with_less_padding_in_random_order() -> None:
    import random

    import torch

    from distill.train.sampler import BucketedBatchOrder

    rng = random.Random(0)
    lengths = [rng.randint(40, 160) for _ in range(2000)]
    torch.manual_seed(0)
    sampler = BucketedBatchOrder(lengths, 32)
    order = list(sampler)
    assert sorted(order) == list(range(2000))
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert all(len(b) == 32 for b in batches[:-1])

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in bs)

    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    assert padding(batches) < 0.2 * padding([shuffled[i : i + 32] for i in range(0, 2000, 32)])
    # The batches do not sweep long -> short: batch means are uncorrelated with their position.
    means = torch.tensor([sum(lengths[j] for j in b) / len(b) for b in batches[:-1]])
    pos = torch.arange(len(means), dtype=torch.float)
    assert abs(torch.corrcoef(torch.stack([means, pos]))[0, 1]) < 0.3
    # Each epoch draws a new order; the same seed draws the same one.
    torch.manual_seed(0)
    assert list(sampler) == order and list(sampler) != order


def test_topk_tensors_pads_ragged_and_empty_steps() -> None:
    from distill.train.kd_data import topk_tensors
    from distill.train.losses import NEG

    ids, lps, valid = topk_tensors([[(3, -0.1), (5, -2.0)], [], [(7, -0.5)]])
    assert ids.tolist() == [[3, 5], [0, 0], [7, 0]]
    assert lps[0].tolist() == pytest.approx([-0.1, -2.0]) and lps[1].tolist() == [NEG, NEG]
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    for out in topk_tensors([]):
        assert tuple(out.shape) == (0, 0)
