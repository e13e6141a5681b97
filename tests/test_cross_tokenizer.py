"""Cross-tokenizer distillation: byte alignment, top-k projection, ULD, the mode resolver."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from distill.train.xtok import (
    AlignStats,
    align,
    group_spans,
    resolve_cross_tokenizer,
    student_bounds,
    uld_steps,
)
from distill.train.xtok_tokens import (
    Candidate,
    TeacherSeq,
    TokenText,
    reconstruct,
    spell_string,
    string_format,
    teacher_from_ids,
    teacher_from_strings,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "data" / "models" / "demo-teacher"


# --- tokenizers ----------------------------------------------------------------------------------


def hand_bpe(merges: list[tuple[str, str]]) -> Any:
    """A byte-level BPE with exactly these merges over the byte alphabet: known tokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>",
                                         *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def unk_wordpiece_like() -> Any:
    """A non-byte-level BPE over a few letters: other characters are <unk>, spaces uncovered."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "ab": 6, "cd": 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("c", "d")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def merged_digits_bpe() -> Any:
    """A byte-level BPE trained here on task text, GPT-2 style: numbers merge ("127" one token),
    unlike the demo teacher's one-token-per-digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill.tasks import make_task

    rows = make_task("arithmetic", "train", 300, 1)
    corpus = [r["solution"] for r in rows] + [" ".join(str(n) for n in range(200))] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def demo_tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(DEMO_TEACHER))


def seq(pieces: list[str], steps: list[list[tuple[str, float]]]) -> TeacherSeq:
    """A teacher sequence from text pieces and (string, probability) top-k; the sampled token is
    the candidate equal to the piece."""
    cands = [[Candidate(s.encode(), math.log(p)) for s, p in st] for st in steps]
    actual = [next((k for k, (s, _) in enumerate(st) if n < len(pieces) and s == pieces[n]),
                   None) for n, st in enumerate(steps)]
    return TeacherSeq([p.encode() for p in pieces], cands, actual)


def dist(tok: Any, target: Any) -> dict[str, float]:
    return {tok.convert_ids_to_tokens(i): p for i, p in zip(target.ids, target.probs, strict=True)}


# --- alignment on hand-made pairs ---------------------------------------------------------------


def test_one_to_one_spans_keep_the_teachers_top_k() -> None:
    tok = hand_bpe([("a", "b"), ("c", "d"), ("Ġ", "cd")])
    t = seq(["ab", " cd"], [[("ab", .7), ("a", .2), ("x", .1)],
                            [(" cd", .6), (" c", .3), ("é", .1)]])
    a = align(t, tok, student_eos=False)
    assert tok.convert_ids_to_tokens(a.student_ids) == ["ab", "Ġcd"]
    assert [s.kind for s in a.spans] == ["1:1", "1:1"]
    assert dist(tok, a.targets[0]) == pytest.approx({"ab": .7, "a": .2, "x": .1})
    # " c" is "Ġ" "c" to this student; "é" is two byte tokens, the first gets the mass
    assert dist(tok, a.targets[1]) == pytest.approx({"Ġcd": .6, "Ġ": .3, "Ã": .1})
    assert a.stats.one_to_one == 2 and a.stats.mass_mapped == pytest.approx(a.stats.mass)
    assert a.teacher_pos == [0, 1] and a.span_first == [0, 1]


def test_one_teacher_token_split_by_the_student_conditions_on_the_prefix() -> None:
    tok = hand_bpe([("a", "b"), ("c", "d")])
    t = seq(["abcd"], [[("abcd", .5), ("abce", .2), ("ab", .2), ("x", .1)]])
    a = align(t, tok, student_eos=False)
    assert tok.convert_ids_to_tokens(a.student_ids) == ["ab", "cd"]
    assert [s.kind for s in a.spans] == ["1:n"]
    # first position: every candidate's first student token ("ab" for three of them)
    assert dist(tok, a.targets[0]) == pytest.approx({"ab": .9, "x": .1})
    # after "ab": "abcd" -> "cd", "abce" -> "c"; "ab" then unknown (unmapped); "x" contradicts
    assert dist(tok, a.targets[1]) == pytest.approx({"cd": .5 / .7, "c": .2 / .7})
    assert a.targets[1].mapped == pytest.approx(.7 / .9)
    assert a.teacher_pos == [0, None] and a.span_first == [0, 0]
    assert a.stats.merged == 2
    assert a.stats.mass_open == pytest.approx(.3)  # "ab" and "x" may continue past the token


def test_teacher_tokens_merged_by_the_student_multiply_along_the_sampled_path() -> None:
    tok = hand_bpe([("1", "2"), ("12", "7")])
    t = seq(["1", "2", "7"], [[("1", .8), ("2", .2)], [("2", .5), ("3", .5)],
                              [("7", .9), ("8", .1)]])
    a = align(t, tok, student_eos=False)
    assert tok.convert_ids_to_tokens(a.student_ids) == ["127"]
    assert [s.kind for s in a.spans] == ["n:1"]
    # P("127") = .8 * .5 * .9; "128" is "12" "8" to the student, "13" is "1" "3"
    assert dist(tok, a.targets[0]) == pytest.approx({"127": .36, "1": .4, "2": .2, "12": .04})


def test_a_broken_span_gets_no_target() -> None:
    tok = hand_bpe([("1", "2")])
    t = seq(["1", "2"], [[("3", .6), ("4", .4)], [("2", 1.0)]])  # sampled "1" outside top-k
    a = align(t, tok, student_eos=False)
    assert a.targets == [None] and a.stats.spans_broken == 1 and a.stats.unaligned == 1


def test_unknown_characters_and_uncovered_spaces_are_counted() -> None:
    tok = unk_wordpiece_like()
    t = seq(["ab", " é", " cd"], [[("ab", 1.0)], [(" é", 1.0)], [(" cd", .7), (" é", .3)]])
    a = align(t, tok, student_eos=False)
    assert tok.convert_ids_to_tokens(a.student_ids) == ["ab", "<unk>", "cd"]
    assert [s.kind for s in a.spans] == ["1:1", "1:1", "1:1"]  # spaces join the next token
    assert a.targets[1] is None and a.stats.unknown == 1
    assert a.stats.unknown_chars == 3  # two uncovered spaces, one <unk> character
    assert dist(tok, a.targets[2]) == pytest.approx({"cd": 1.0})
    assert a.targets[2].mapped == pytest.approx(.7)  # " é" spells as <unk>: unmapped


def test_eos_step_maps_onto_the_students_eos() -> None:
    tok = hand_bpe([("a", "b")])
    t = seq(["ab"], [[("ab", 1.0)], [("x", .25)]])
    t.steps[1].append(Candidate(b"", math.log(.75), eos=True))
    t.actual[1] = 1
    a = align(t, tok)
    assert a.student_ids[-1] == tok.eos_token_id
    assert dist(tok, a.targets[-1]) == pytest.approx({"</s>": .75, "x": .25})
    assert a.teacher_pos[-1] == 1
    assert align(seq(["ab"], [[("ab", 1.0)]]), tok).targets[-1] is None  # no EOS step stored


def test_group_spans_agrees_with_trl_on_plain_byte_offsets(
        demo_tok: Any, merged_digits_bpe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss

    text = "The pens cost 3 * 14 = 42 dollars.\nTogether that is 127 + 42 = 169 dollars."
    t_ids = demo_tok(text, add_special_tokens=False)["input_ids"]
    t_pieces = [TokenText(demo_tok)(i) for i in t_ids]
    assert b"".join(t_pieces) == text.encode()
    t_ends = [sum(map(len, t_pieces[: k + 1])) for k in range(len(t_pieces))]
    _, s_ends, _ = student_bounds(merged_digits_bpe, text)
    ours = group_spans(t_ends, s_ends)
    s_groups, t_groups = ULDLoss._align_by_byte_offsets(
        [(0, e) for e in s_ends], [(0, e) for e in t_ends])
    assert [(tg[0], tg[-1] + 1, sg[0], sg[-1] + 1) for sg, tg in zip(s_groups, t_groups,
                                                                      strict=True)] == ours
    assert any(t1 - t0 > 1 and s1 - s0 == 1 for t0, t1, s0, s1 in ours)  # "127": n:1


def test_place_value_teacher_onto_merged_digit_student(demo_tok: Any,
                                                       merged_digits_bpe: Any) -> None:
    """Real tokenizers, synthetic top-k (the sampled token .9, a "5" .1 everywhere): numbers the
    teacher spells digit by digit are one or two student tokens."""
    text = "So 127 + 42 = 169."
    ids = demo_tok(text, add_special_tokens=False)["input_ids"]
    five = demo_tok("5", add_special_tokens=False)["input_ids"][0]
    top = [[(i, math.log(.9)), (five, math.log(.1))] for i in ids]
    a = align(teacher_from_ids(ids, top, demo_tok), merged_digits_bpe)
    assert a.text == text and a.student_ids[-1] == merged_digits_bpe.eos_token_id
    assert merged_digits_bpe.decode(a.student_ids[:-1]) == text
    toks = merged_digits_bpe.convert_ids_to_tokens(a.student_ids)
    s127, s42 = (next(s for s in a.spans if toks[s.s0] == t) for t in ("Ġ12", "Ġ42"))
    assert (s42.t1 - s42.t0, s42.s1 - s42.s0) == (3, 1)  # " ", "4", "2" -> " 42"
    # " ", "1", "2", "7" -> " 12", "7": the teacher's "2" and the student's " 12" end together
    assert (s127.t1 - s127.t0, s127.s1 - s127.s0) == (3, 1)
    assert a.spans[a.spans.index(s127) + 1].kind == "1:1"
    # " 42": the sampled path is .9 ** 3; every alternative is spelled, so all mass maps
    d42 = dict(zip(a.targets[s42.s0].ids, a.targets[s42.s0].probs, strict=True))
    assert d42[a.student_ids[s42.s0]] == pytest.approx(.9 ** 3)
    # "7" after " 12": the teacher's own top-k at "7"
    assert dist(merged_digits_bpe, a.targets[s127.s0 + 1]) == pytest.approx({"7": .9, "5": .1})
    assert a.stats.mass_mapped == pytest.approx(a.stats.mass)


@pytest.mark.real
def test_demo_teacher_onto_the_real_smollm2_tokenizer(real_model: Path, demo_tok: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoTokenizer.from_pretrained(str(real_model))
    teacher = AutoModelForCausalLM.from_pretrained(str(DEMO_TEACHER)).float().eval()
    text = "The pens cost 3 * 14 = 42 dollars.\nThe answer is 42. Café 😀"
    ids = demo_tok(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lp = teacher(torch.tensor([ids])).logits[0].log_softmax(-1)
    # position n's top-k predicts token n: shift by one (the first token has no predictor here)
    vals, idx = lp[:-1].topk(8, -1)
    top = [[(ids[0], 0.0)]] + [[(int(i), float(v)) for i, v in zip(idx[n], vals[n],
                                                                    strict=True)]
                               for n in range(len(ids) - 1)]
    a = align(teacher_from_ids(ids, top, demo_tok), student)
    assert a.text == text and student.decode(a.student_ids[:-1]) == text
    assert a.stats.unknown == 0 and a.stats.unknown_chars == 0
    # "😀": the teacher's " " and three byte tokens are one student token, the fourth is shared
    emoji = next(s for s in a.spans if s.end == len(text.encode()) - 1)
    assert (emoji.t1 - emoji.t0, emoji.s1 - emoji.s0) == (4, 1)
    assert a.stats.one_to_one / a.stats.positions > 0.5
    assert a.stats.mass_mapped / a.stats.mass > 0.9


# --- OpenAI-style string top-k -------------------------------------------------------------------


def test_string_forms_are_spelled_as_bytes() -> None:
    assert string_format([[("Ġthe", 0.0), ("Ċ", 0.0)]]) == "byte_level"
    assert string_format([[("▁the", 0.0)]]) == "sentencepiece"
    assert string_format([[(" the", 0.0), ("Ġ", 0.0)]]) == "text"
    assert spell_string("Ġthe", "byte_level").text == b" the"
    assert spell_string("▁the", "sentencepiece").text == b" the"
    assert spell_string("<0x0A>", "sentencepiece").text == b"\n"
    assert spell_string("bytes:\\xf0\\x9f", "text").text == b"\xf0\x9f"
    assert spell_string("\\xe2\\x80", "text").text == b"\xe2\x80"
    assert spell_string("\ufffd", "text").text is None
    assert spell_string("token_id:5", "text").text is None  # no teacher tokenizer to read it
    assert spell_string("<|im_end|>", "text").eos


def test_reconstruct_recovers_the_sampled_path_with_a_wildcard() -> None:
    steps = [[Candidate(b"ab", -.1), Candidate(b"a", -2.0)],
             [Candidate(b" ce", -.5), Candidate(b" x", -1.0)],  # " cd" was sampled
             [Candidate(b"!", -.2)]]
    pieces, actual, wild = reconstruct(b"ab cd!", steps)
    assert pieces == [b"ab", b" cd", b"!"] and actual == [0, None, 0] and wild == 1
    assert reconstruct(b"zz", [[Candidate(b"ab", 0.0)]]) is not None  # one wildcard
    assert reconstruct(b"ab", [[Candidate(b"ab", 0.0)], [Candidate(b"c", 0.0)]]) is None


def test_openai_strings_into_a_different_student_vocabulary(merged_digits_bpe: Any) -> None:
    """Top-k strings as an OpenAI server sends them, partial UTF-8 included, mapped into the
    student's vocabulary: the mass fractions are what the candidates say."""
    text = "It is 42 😀 ok"
    top = [[("It", -0.1), ("The", -2.4)],
           [(" is", -0.05), (" was", -3.0)],
           [(" ", -0.2), (" the", -1.7)],
           [("4", -0.3), ("5", -1.4)],
           [("2", -0.1), ("0", -2.4)],
           [("bytes: \\xf0\\x9f", -0.2), (" ok", -1.8)],
           [("bytes:\\x98\\x80", -0.05), ("\ufffd", -3.0)],
           [(" ok", -0.3), (" fine", -1.5), ("<|im_end|>", -2.0)],
           [("<|im_end|>", -0.01), (".", -4.6)]]
    t = teacher_from_strings(text, top)
    assert t is not None and t.wildcards == 0
    assert t.pieces[5:7] == [b" \xf0\x9f", b"\x98\x80"] and t.eos_step is not None
    a = align(t, merged_digits_bpe)
    assert merged_digits_bpe.decode(a.student_ids[:-1]) == text
    # the student spells the emoji byte by byte (no emoji in its corpus): a boundary after
    # "\x9f" is shared, so the teacher's two byte tokens are two 1:n spans
    first, second = (next(s for s in a.spans if s.t0 == i) for i in (5, 6))
    assert (first.t1, first.s1 - first.s0, second.t1, second.s1 - second.s0) == (6, 3, 7, 2)
    head = a.targets[first.s0]
    assert head is not None and head.mapped == pytest.approx(1.0)
    ok, path = math.exp(-1.8), math.exp(-0.2)
    assert dict(zip(head.ids, head.probs, strict=True)) == pytest.approx(
        {a.student_ids[first.s0]: path / (ok + path),
         merged_digits_bpe(" ok")["input_ids"][0]: ok / (ok + path)})
    # "\ufffd" (vLLM's unknown partial bytes) is unmapped mass
    tail = a.targets[second.s0]
    assert tail is not None and tail.probs == [1.0]
    assert tail.mapped == pytest.approx(math.exp(-.05) / (math.exp(-.05) + math.exp(-3.0)))
    eos = a.targets[-1]
    assert eos is not None and eos.ids[0] == merged_digits_bpe.eos_token_id
    assert eos.probs[0] == pytest.approx(math.exp(-0.01) / (math.exp(-0.01) + math.exp(-4.6)))
    # " 42" is one student token: P(" ") * P("4") * P("2") against " the", " 5" and " 40"
    num = next(s for s in a.spans if s.t0 == 2)
    assert (num.t1, num.s1 - num.s0) == (5, 1)
    d = dist(merged_digits_bpe, a.targets[num.s0])
    the, p5, p42, p40 = (math.exp(x) for x in (-1.7, -1.6, -0.6, -2.9))
    total = the + p5 + p42 + p40
    assert d == pytest.approx({"Ġ42": p42 / total, "Ġthe": the / total, "Ġ5": p5 / total,
                               "Ġ40": p40 / total})


def test_stats_add_up_over_rows() -> None:
    tok = hand_bpe([("a", "b")])
    total = AlignStats()
    for _ in range(3):
        total += align(seq(["ab"], [[("ab", .5), ("b", .5)]]), tok, student_eos=False).stats
    assert total.positions == 3 and total.one_to_one == 3
    assert total.summary()["mass_mapped"] == 1.0


# --- ULD -----------------------------------------------------------------------------------------


def test_sorted_l1_by_hand() -> None:
    import torch

    from distill.train.uld import sorted_l1

    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.4, 0.6])
    # sorted: [.5, .3, .2] vs [.6, .4, 0]: .1 + .1 + .2
    assert float(sorted_l1(p, q)) == pytest.approx(0.4)
    assert float(sorted_l1(q, p)) == pytest.approx(0.4)
    assert float(sorted_l1(p, p[[2, 0, 1]])) == pytest.approx(0.0)  # permutation-blind


def test_uld_topk_equals_the_full_sort_and_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from distill.train.uld import uld_logits, uld_topk

    torch.manual_seed(0)
    s_logits = torch.randn(2, 5, 30)
    t_logits = torch.randn(2, 5, 45) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    # a top-k teacher, renormalized: against the naive zero-padded full sort
    tlp, _ = t_logits.log_softmax(-1).topk(6, -1)
    valid = torch.ones_like(tlp, dtype=torch.bool)
    valid[0, 0, 3:] = False
    tp = torch.softmax(tlp.masked_fill(~valid, -1e9), -1) * valid
    sp = torch.softmax(s_logits, -1)
    naive = (sp.sort(-1, descending=True).values
             - torch.nn.functional.pad(tp.sort(-1, descending=True).values, (0, 24))).abs()
    assert float(uld_topk(s_logits, tlp, valid, mask)) == pytest.approx(
        float(naive.sum(-1).mean()), rel=1e-5)
    # full logits: TRL's ULDLoss, positionally paired (no extended alignment, no EOS skipping)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
                          uld_student_temperature=2.0, uld_teacher_temperature=2.0,
                          uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                          use_extended_uld=False, uld_token_merge_strategy="observed")
    labels = torch.zeros(2, 5, dtype=torch.long)
    trl = ULDLoss(cfg)(s_logits, t_logits, labels, labels, labels, labels)
    assert float(uld_logits(s_logits, t_logits, mask, temperature=2.0)) == pytest.approx(
        float(trl), rel=1e-5)


def test_span_log_scale_multiplies_the_later_tokens() -> None:
    import torch

    from distill.train.uld import span_log_scale

    lp = torch.log(torch.tensor([[[.5, .5], [.2, .8], [.9, .1], [.3, .7]]]))
    labels = torch.tensor([[0, 1, 0, 1]])
    first = torch.tensor([[0, 0, 0, 3]])  # one span of three positions, then one of one
    scale = span_log_scale(lp, labels, first).exp()
    assert scale[0].tolist() == pytest.approx([.8 * .9, 1.0, 1.0, 1.0])


def test_uld_steps_pairs_span_starts_with_the_teachers_scale() -> None:
    tok = hand_bpe([("1", "2"), ("12", "7")])
    t = seq(["1", "2", "7"], [[("1", .8), ("2", .2)], [("2", .5), ("3", .5)],
                              [("7", .9), ("8", .1)]])
    a = align(t, tok, student_eos=False)
    steps = uld_steps(a, t, fallback_only=False)
    lps, scale = steps[0]
    assert lps == pytest.approx([math.log(.8), math.log(.2)])
    assert math.exp(scale) == pytest.approx(.5 * .9)
    # at T = 2 each later position is renormalized: .5 and sqrt(.9) / (sqrt(.9) + sqrt(.1))
    hot = uld_steps(a, t, fallback_only=False, temperature=2.0)[0]
    assert math.exp(hot[1]) == pytest.approx(.5 * .75)
    assert uld_steps(a, t) == [None]  # aligned: no fallback needed


# --- the mode resolver ---------------------------------------------------------------------------


def test_resolver(demo_tok: Any, merged_digits_bpe: Any) -> None:
    assert resolve_cross_tokenizer("auto", demo_tok, demo_tok) == "exact"
    assert resolve_cross_tokenizer("auto", merged_digits_bpe, demo_tok) == "align"
    assert resolve_cross_tokenizer("uld", demo_tok, demo_tok) == "uld"
    assert resolve_cross_tokenizer("align", demo_tok, None) == "align"
    own = [demo_tok.decode([i]) for i in demo_tok("The answer is 42.")["input_ids"]]
    assert resolve_cross_tokenizer("auto", demo_tok, None, sample_tokens=own) == "exact"
    assert resolve_cross_tokenizer("auto", demo_tok, None,
                                   sample_tokens=[" answering", " 42."] * 3) == "align"
    assert resolve_cross_tokenizer("auto", demo_tok, None) == "align"
    with pytest.raises(ValueError, match="cross_tokenizer"):
        resolve_cross_tokenizer("vocab", demo_tok, None)  # type: ignore[arg-type]


# --- a tiny training loop ------------------------------------------------------------------------


def _teacher_rows(demo_tok: Any, n: int, k: int = 8, temperature: float = 2.0
                  ) -> list[TeacherSeq]:
    """The demo teacher's softened top-k on gold solutions (teacher-forced, EOS step included)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.tasks import make_task, prompt_text

    model = AutoModelForCausalLM.from_pretrained(str(DEMO_TEACHER)).float().eval()
    out = []
    for row in make_task("arithmetic", "train", n, 3):
        prompt = demo_tok.apply_chat_template(
            [{"role": "user", "content": prompt_text(row["question"])}],
            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        comp = demo_tok(row["solution"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:]
        vals, idx = (logits / temperature).log_softmax(-1).topk(k, -1)
        top = [[(int(i), float(v)) for i, v in zip(idx[p], vals[p], strict=True)]
               for p in range(len(comp) + 1)]
        out.append(teacher_from_ids(comp, top, demo_tok))
    return out


def _batch(alignments: list[Any], uld: list[list[Any]]) -> dict[str, Any]:
    import torch

    from distill.train.losses import NEG

    b, c = len(alignments), max(len(a.student_ids) for a in alignments)
    k = max(len(t.ids) for a in alignments for t in a.targets if t is not None)
    ku = max(len(s[0]) for u in uld for s in u if s is not None)
    out = {"input_ids": torch.zeros(b, c + 1, dtype=torch.long),
           "labels": torch.full((b, c), -100), "topk_ids": torch.zeros(b, c, k, dtype=torch.long),
           "topk_lp": torch.full((b, c, k), NEG), "topk_valid": torch.zeros(b, c, k, dtype=bool),
           "uld_lp": torch.full((b, c, ku), NEG), "uld_valid": torch.zeros(b, c, ku, dtype=bool),
           "uld_scale": torch.zeros(b, c), "first": torch.full((b, c), -1)}
    for r, (a, u) in enumerate(zip(alignments, uld, strict=True)):
        n = len(a.student_ids)
        out["input_ids"][r, 1: n + 1] = torch.tensor(a.student_ids)
        out["labels"][r, :n] = torch.tensor(a.student_ids)
        out["first"][r, :n] = torch.tensor(a.span_first)
        for j, step in enumerate(a.topk_steps()):
            for m, (i, lp) in enumerate(step):
                out["topk_ids"][r, j, m], out["topk_lp"][r, j, m] = i, lp
                out["topk_valid"][r, j, m] = True
        for j, s in enumerate(u):
            if s is not None:
                out["uld_lp"][r, j, : len(s[0])] = torch.tensor(s[0])
                out["uld_valid"][r, j, : len(s[0])] = True
                out["uld_scale"][r, j] = s[1]
    return out


def _kl(logits: Any, x: dict[str, Any]) -> float:
    from distill.train.losses import masked_mean, topk_divergence

    d = topk_divergence(logits, x["topk_lp"], x["topk_ids"], x["topk_valid"], 0.0, 1.0)
    return float(masked_mean(d, x["topk_valid"].any(-1)))


def test_cross_tokenizer_losses_pull_a_tiny_student_toward_the_teacher(
        demo_tok: Any, merged_digits_bpe: Any) -> None:
    """A few dozen plain-torch steps of the aligned KD loss lower the student's KL from the
    projected teacher at aligned positions; ULD steps lower the ULD distance."""
    import torch

    from distill.train.losses import kd_loss
    from distill.train.uld import span_log_scale, uld_topk
    from tests.tiny import make_tiny_lm

    torch.manual_seed(0)
    rows = _teacher_rows(demo_tok, 4)
    alignments = [align(t, merged_digits_bpe) for t in rows]
    assert sum(a.stats.merged for a in alignments) > 0  # numbers: teacher digits, student words
    x = _batch(alignments, [uld_steps(a, t, fallback_only=False)
                            for a, t in zip(alignments, rows, strict=True)])
    results = {}
    for loss_kind in ("align", "uld"):
        model = make_tiny_lm(None, merged_digits_bpe, hidden=32, layers=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def measure(model: Any = model) -> tuple[float, float]:
            with torch.no_grad():
                logits = model(input_ids=x["input_ids"]).logits[:, :-1]
                lp = logits.log_softmax(-1)
                scale = span_log_scale(lp, x["labels"], x["first"])
                u = uld_topk(logits, x["uld_lp"], x["uld_valid"], x["labels"] != -100,
                             student_log_scale=scale, teacher_log_scale=x["uld_scale"])
            return _kl(logits, x), float(u)

        before = measure()
        for _ in range(40):
            logits = model(input_ids=x["input_ids"]).logits[:, :-1]
            if loss_kind == "align":
                loss = kd_loss(logits, x["labels"], x["topk_lp"], x["topk_valid"].any(-1),
                               alpha=0.0, temperature=1.0, beta=0.0, topk_ids=x["topk_ids"],
                               topk_valid=x["topk_valid"]).loss
            else:
                scale = span_log_scale(logits.log_softmax(-1), x["labels"], x["first"])
                loss = uld_topk(logits, x["uld_lp"], x["uld_valid"], x["labels"] != -100,
                                student_log_scale=scale, teacher_log_scale=x["uld_scale"])
            loss.backward()
            opt.step()
            opt.zero_grad()
        results[loss_kind] = (before, measure())
    (kl0, _), (kl1, _) = results["align"]
    assert kl1 < 0.5 * kl0
    (_, u0), (_, u1) = results["uld"]
    assert u1 < 0.7 * u0


# --- rows as the generate stage stores them -------------------------------------------------------


def test_row_targets_for_id_and_string_rows(demo_tok: Any, merged_digits_bpe: Any) -> None:
    from collections import Counter

    from distill.train.xtok_rows import row_targets, uld_tensors

    text = "The pens cost 3 * 14 = 42 dollars."
    ids = demo_tok(text, add_special_tokens=False)["input_ids"]
    five = demo_tok("5", add_special_tokens=False)["input_ids"][0]
    int_top = [[(i, -0.1), (five, -2.4)] for i in ids] + [[(demo_tok.eos_token_id, -0.01)]]
    str_top = [[(demo_tok.decode([i]), lp) for i, lp in step] for step in int_top[:-1]]
    str_top.append([("<|end|>", -0.01)])
    stats, counts = AlignStats(), Counter()
    rows = {"ids": {"token_ids": ids, "top_logprobs": int_top, "response": text,
                    "finish_reason": "stop"},
            "strings": {"response": text, "top_logprobs": str_top, "finish_reason": "stop"}}
    got = {}
    for name, row in rows.items():
        r = row_targets(row, merged_digits_bpe, demo_tok if name == "ids" else None,
                        mode="align", stats=stats, counts=counts)
        assert r is not None and r.text == text
        assert merged_digits_bpe.decode(r.ids) == text + "</s>"
        assert len(r.steps) == len(r.uld) == len(r.span_first) == len(r.ids)
        assert all(r.steps) and not any(r.uld)  # everything aligned: no ULD fallback
        got[name] = r.steps
    flat = {k: [(i, round(lp, 9)) for step in v for i, lp in step] for k, v in got.items()}
    assert flat["ids"] == flat["strings"]  # same teacher, either wire form
    assert counts["rows_with_soft_targets"] == 2
    cut = row_targets(rows["ids"] | {"finish_reason": "length"}, merged_digits_bpe, demo_tok,
                      mode="uld", stats=stats, counts=counts)
    assert cut is not None and cut.ids[-1] != merged_digits_bpe.eos_token_id
    assert not any(cut.steps)
    starts = [j for j, f in enumerate(cut.span_first) if f == j]
    assert [j for j, u in enumerate(cut.uld) if u is not None] == starts
    lps, valid, scale = uld_tensors(cut.uld)
    assert lps.shape == valid.shape == (len(cut.ids), 2) and scale.shape == (len(cut.ids),)
    assert valid[starts].all() and not valid.any(-1)[[j for j in range(len(cut.ids))
                                                     if j not in starts]].any()
    assert row_targets({"response": text}, merged_digits_bpe, None, mode="align", stats=stats,
                       counts=counts) is None and counts["rows_unaligned"] == 1


# --- through the real trainer: the demo teacher into a student with another tokenizer -----------


@pytest.fixture(scope="module")
def xtok_project(tmp_path_factory: pytest.TempPathFactory, merged_digits_bpe: Any
                 ) -> tuple[Any, Any]:
    """generate (demo teacher, stored top-8) → filter, for a tiny fresh student whose
    byte-level BPE merges numbers: a run directory whose sft rows carry the teacher's ids."""
    from distill.config import load_config
    from distill.filter.stage import run as run_filter
    from distill.generate.stage import run as run_generate
    from distill.records import RunDir

    root = tmp_path_factory.mktemp("xtok-project")
    merged_digits_bpe.save_pretrained(root / "student-tok")
    (root / "pipelines").mkdir()
    (root / "pipelines" / "xtok.yaml").write_text(f"""
name: xtok
seeds: {{task: {{name: arithmetic, split: train, n: 24, seed: 0}}}}
teacher: {{backend: transformers, model: {DEMO_TEACHER}, dtype: float32, top_logprobs: 8,
          batch_size: 24}}
generate: {{prompt: cot, temperature: 0.7, max_tokens: 96}}
filter: {{verify: {{}}, dedup: null}}
train:
  method: kd
  student_config: {{model_type: llama, hidden_size: 32, intermediate_size: 64,
                    num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4,
                    max_position_embeddings: 512, tie_word_embeddings: true}}
  tokenizer: {root / "student-tok"}
  max_steps: 40
  batch_size: 4
  learning_rate: 0.01
  max_length: 256
  logging_steps: 5
  gradient_checkpointing: false
  kd: {{temperature: 1.0, alpha: 0.5, soft_targets: stored}}
""")
    cfg = load_config(root / "pipelines" / "xtok.yaml")
    run_dir = RunDir(root / "run")
    run_generate(cfg, run_dir)
    run_filter(cfg, run_dir)
    return cfg, run_dir


def _held_out_rows(demo_tok: Any, n: int = 6) -> list[dict[str, Any]]:
    """Rows as the generate stage stores them, for problems no training row has: the demo
    teacher's raw top-8 teacher-forced on gold solutions of another seed stream."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.tasks import make_task, prompt_text

    model = AutoModelForCausalLM.from_pretrained(str(DEMO_TEACHER)).float().eval()
    rows = []
    for row in make_task("arithmetic", "train", n, 7):
        messages = [{"role": "user", "content": prompt_text(row["question"])}]
        prompt = demo_tok.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
        comp = demo_tok(row["solution"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:]
        vals, idx = logits.float().log_softmax(-1).topk(8, -1)
        rows.append({"question": row["question"], "response": row["solution"],
                     "messages": [*messages, {"role": "assistant", "content": row["solution"]}],
                     "token_ids": comp, "finish_reason": "stop",
                     "top_logprobs": [[(int(i), float(v)) for i, v in zip(ix, vx, strict=True)]
                                      for ix, vx in zip(idx.tolist(), vals.tolist(),
                                                        strict=True)]})
    return rows


def _divergences(model: Any, tok: Any, demo_tok: Any, rows: list[dict[str, Any]]
                 ) -> tuple[float, float]:
    """(forward KL from the aligned teacher targets, ULD at every span start), both at T = 1,
    averaged over the rows' student positions."""
    import torch

    from distill.train.kd_data import KDCollator, xtok_examples
    from distill.train.losses import gather_positions, masked_mean, topk_divergence
    from distill.train.uld import span_log_scale, uld_topk

    out = []
    for mode in ("align", "uld"):
        ex, _, _ = xtok_examples(rows, tok, demo_tok, mode=mode, max_length=256)
        x = KDCollator(tok.pad_token_id)(ex)
        with torch.no_grad():
            logits = gather_positions(model(input_ids=x["input_ids"],
                                            attention_mask=x["attention_mask"]).logits, x["pos"])
        if mode == "align":
            d = topk_divergence(logits, x["topk_logprobs"], x["topk_ids"], x["topk_valid"],
                                0.0, 1.0)
            out.append(float(masked_mean(d, x["soft_mask"] & (x["labels"] != -100))))
        else:
            scale = span_log_scale(logits.log_softmax(-1), x["labels"], x["span_first"])
            out.append(float(uld_topk(logits, x["uld_logprobs"], x["uld_valid"],
                                      x["labels"] != -100, student_log_scale=scale,
                                      teacher_log_scale=x["uld_scale"])))
    return out[0], out[1]


def test_cross_tokenizer_kd_through_the_train_stage(xtok_project: tuple[Any, Any],
                                                    demo_tok: Any) -> None:
    """`cross_tokenizer: auto` with different vocabularies runs `align`: the student's KL from
    the teacher's projected top-k on held-out problems falls, and the manifest's train entry,
    the student's card and the report record the mode and the teacher mass that mapped."""
    from transformers import AutoModelForCausalLM

    from distill.evaluate.report import write_report
    from distill.pipeline import run_stage
    from distill.train.student import build_student, load_tokenizer

    cfg, run_dir = xtok_project
    entry = run_stage("train", cfg, run_dir)
    info = run_dir.manifest()["stages"]["train"]["students"]["student"]
    assert entry["students"]["student"]["cross_tokenizer"] == info["cross_tokenizer"] == "align"
    x = info["xtok"]
    assert 0.8 < x["mass_mapped"] <= 1.0 and x["merged"] > 0.05  # numbers: n teacher : 1 student
    assert x["positions_with_target"] > 0.8 and x["rows_unaligned"] == 0
    assert info["rows_with_soft_targets"] == info["train_rows"] > 0
    assert info["final_soft"] is not None and info["steps"] == 40
    student_dir = run_dir.stage("student")
    assert "cross-tokenizer: align (" in (student_dir / "README.md").read_text()
    report = write_report(run_dir).read_text()
    assert "## Soft targets across tokenizers" in report
    assert f"{x['mass_mapped'] * 100:.1f}% of the teacher's top-k mass mapped" in report

    tok = load_tokenizer(cfg)
    held_out = _held_out_rows(demo_tok)
    kl0, _ = _divergences(build_student(cfg, tok), tok, demo_tok, held_out)
    kl1, _ = _divergences(AutoModelForCausalLM.from_pretrained(student_dir), tok, demo_tok,
                          held_out)
    assert kl1 < 0.8 * kl0, (kl0, kl1)


def test_uld_from_a_local_teachers_logits(xtok_project: tuple[Any, Any], demo_tok: Any,
                                          tmp_path: Path) -> None:
    """`cross_tokenizer: uld`, soft targets from the local teacher's logits (scored once into
    top-k): ULD only, no mass mapped, and the student's ULD distance to the teacher falls."""
    from transformers import AutoModelForCausalLM

    from distill.config import load_config
    from distill.io import read_stage_rows
    from distill.train.kd import train_kd
    from distill.train.student import build_student, load_tokenizer

    cfg, run_dir = xtok_project
    cfg = load_config(Path(cfg.root) / "pipelines" / "xtok.yaml",
                      ["train.kd.cross_tokenizer=uld", "train.kd.soft_targets=teacher"])
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")
    info = train_kd(cfg, None, [{"question": r["question"], "messages": r["messages"]}
                                for r in rows], tmp_path / "student")
    assert info["cross_tokenizer"] == "uld" and info["soft_targets"] == "teacher logits"
    assert info["xtok"]["uld_positions"] > 0 and "mass_mapped" not in info["xtok"]
    assert info["final_uld"] is not None and info["final_soft"] is None and not info["top_k"]

    tok = load_tokenizer(cfg)
    held_out = _held_out_rows(demo_tok)
    _, u0 = _divergences(build_student(cfg, tok), tok, demo_tok, held_out)
    _, u1 = _divergences(AutoModelForCausalLM.from_pretrained(tmp_path / "student"), tok,
                         demo_tok, held_out)
    assert u1 < 0.8 * u0, (u0, u1)


def test_local_teacher_scoring_reproduces_the_stored_top_k(xtok_project: tuple[Any, Any],
                                                            demo_tok: Any) -> None:
    """A local teacher scored up front gives the top-k the generate stage stored for the same
    tokens (the transformers backend stores the raw log-probs of what it sampled)."""
    from transformers import AutoModelForCausalLM

    from distill.io import read_stage_rows
    from distill.train.kd_data import teacher_prompts_and_texts
    from distill.train.xtok_rows import teacher_scored_rows

    _, run_dir = xtok_project
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")[:6]
    model = AutoModelForCausalLM.from_pretrained(str(DEMO_TEACHER)).float().eval()
    prompts, texts = teacher_prompts_and_texts(rows, demo_tok)
    scored = teacher_scored_rows(rows, model, demo_tok, prompts, texts, k=8, batch_size=4)
    compared = 0
    for stored, again in zip(rows, scored, strict=True):
        if again["token_ids"] != stored["token_ids"]:
            continue  # the text re-tokenized differently: other positions, nothing to compare
        # plus the EOS step, which the transformers backend does not store
        assert len(again["top_logprobs"]) == len(stored["top_logprobs"]) + 1
        for a, b in zip(again["top_logprobs"], stored["top_logprobs"], strict=False):
            assert [t for t, _ in a][:3] == [int(t) for t, _ in b][:3]
            assert [lp for _, lp in a][:3] == pytest.approx([lp for _, lp in b][:3], abs=2e-3)
        compared += 1
    assert compared >= 4


def test_cross_tokenizer_refusals(xtok_project: tuple[Any, Any], tmp_path: Path) -> None:
    """What cannot work across tokenizers is a one-line ConfigError: the hidden-state loss, GKD,
    and string top-k that do not spell the responses; a bad mode is refused at load."""
    from distill.config import ConfigError, load_config
    from distill.io import read_stage_rows
    from distill.train.gkd import train_gkd
    from distill.train.kd import train_kd

    cfg, run_dir = xtok_project
    path = Path(cfg.root) / "pipelines" / "xtok.yaml"
    rows = read_stage_rows(run_dir.stage("sft"), "sft.jsonl")
    with pytest.raises(ConfigError, match="hidden_weight"):
        train_kd(load_config(path, ["train.kd.hidden_weight=1.0"]), run_dir, rows,
                 tmp_path / "s")
    with pytest.raises(ConfigError, match="vocabular"):
        train_gkd(load_config(path, ["train.method=gkd"]), rows, tmp_path / "s")
    api = load_config(path, ["teacher.backend=openai", "teacher.model=gpt-x"])
    garbled = [r | {"token_ids": None, "top_logprobs": [[("\u0444\u044b\u0432", lp)
                                                         for _, lp in step]
                                                        for step in r["top_logprobs"]]}
               for r in rows]
    with pytest.raises(ConfigError, match="do not spell"):
        train_kd(api, None, garbled, tmp_path / "s")
    with pytest.raises(ConfigError, match="cross_tokenizer"):
        load_config(path, ["train.kd.cross_tokenizer=vocab"])
    assert not (tmp_path / "s").exists()


def test_xtok_loss_combines_the_parts_by_hand() -> None:
    """The trainer's cross-tokenizer loss on a collated batch, against a plain-Python value:
    alpha * CE + (1 - alpha) * (T^2 * KL(aligned top-k) + uld_weight * ULD), each part over its
    own positions; a batch without soft targets trains on the CE alone."""
    import torch

    from distill.config import KDConfig
    from distill.train.kd import xtok_loss
    from distill.train.kd_data import KDCollator, KDExample, topk_tensors
    from distill.train.xtok_rows import uld_tensors

    a = KDExample(input_ids=[0, 1, 2], prompt_len=1)  # completion [1, 2]
    a.topk_ids, a.topk_logprobs, a.topk_valid = topk_tensors(
        [[(1, math.log(0.7)), (3, math.log(0.3))], []])
    a.uld_logprobs, a.uld_valid, a.uld_scale = uld_tensors(
        [None, ([math.log(0.6), math.log(0.4)], math.log(0.5))])
    a.span_first = torch.tensor([0, 1])
    b = KDExample(input_ids=[0, 3], prompt_len=1)  # completion [3], no teacher targets
    x = KDCollator(pad_id=0)([a, b])
    assert x["span_first"][1].tolist() == [-1, -1] and not x["uld_valid"][1].any()
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4)
    kd = KDConfig(alpha=0.3, temperature=2.0, uld_weight=0.5)
    parts, uld = xtok_loss(logits, x, kd, beta=0.0)

    def softmax(v: list[float], t: float = 1.0) -> list[float]:
        e = [math.exp(z / t) for z in v]
        return [z / sum(e) for z in e]

    lg = logits.tolist()
    ce = -sum(math.log(softmax(lg[r][c])[y]) for r, c, y in ((0, 0, 1), (0, 1, 2), (1, 0, 3))) / 3
    p = softmax([math.log(0.7), math.log(0.3)], 2.0)
    q = softmax(lg[0][0], 2.0)
    q3 = [q[1], q[3], 1 - q[1] - q[3]]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q3[:2], strict=True))
    tp = sorted([v * 0.5 for v in softmax([math.log(0.6), math.log(0.4)], 2.0)] + [0, 0],
                reverse=True)
    sp = sorted(softmax(lg[0][1], 2.0), reverse=True)
    u = sum(abs(s - t) for s, t in zip(sp, tp, strict=True))
    assert uld is not None and float(uld) == pytest.approx(u, rel=1e-5)
    assert float(parts.soft) == pytest.approx(kl, rel=1e-5)
    assert float(parts.loss) == pytest.approx(0.3 * ce + 0.7 * (4 * kl + 0.5 * u), rel=1e-5)

    y = KDCollator(pad_id=0)([b])
    alone, none = xtok_loss(logits[1:, :1], y, kd, beta=0.0)
    assert none is None and float(alone.loss) == pytest.approx(
        -math.log(softmax(lg[1][0])[3]), rel=1e-5)
