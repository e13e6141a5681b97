"""The offline demo's tokenizer: byte-level BPE with place-value digits and a chat template.

Shared by every demo model (`demo_teacher`): every digit its own token, with its place value;
chat-role special tokens; a Jinja chat template with ``{% generation %}`` markers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.tasks import make_task, prompt_text

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}<|end|>\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TOKENIZER_VOCAB = 512


# --- tokenizer ---------------------------------------------------------------------------------

# Digits are tokenized with their place value ("abacus" digits): the normalizer rewrites a
# hundreds digit as a fullwidth digit and a tens digit as a subscript digit, and the decoder maps
# them back, so "127" is the three tokens 1(hundreds) 2(tens) 7 and decodes to "127" again. A tiny
# model can then line up the digits of two numbers by content instead of by counting positions,
# which is what makes carries learnable in minutes on a CPU. Other text round-trips unchanged.
HUNDREDS = "０１２３４５６７８９"
TENS = "₀₁₂₃₄₅₆₇₈₉"


def _place_value_normalizer() -> Any:
    from tokenizers import Regex, normalizers

    rules = [normalizers.Replace(Regex(f"{d}(?=[0-9][0-9](?![0-9]))"), HUNDREDS[d])
             for d in range(10)]
    rules += [normalizers.Replace(Regex(f"{d}(?=[0-9](?![0-9]))"), TENS[d]) for d in range(10)]
    return normalizers.Sequence(rules)


def _corpus(n_rows: int, seed: int) -> Iterator[str]:
    # Every number 0..999 a few times, so each place-value digit becomes one token.
    sweep = " ".join(str(n) for n in range(1000))
    yield from [sweep] * 10
    for row in make_task("arithmetic", "train", n_rows, seed):
        yield prompt_text(row["question"])
        yield row["solution"]


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = TOKENIZER_VOCAB,
                    n_rows: int = 4000, seed: int = 0) -> Any:
    """Train a byte-level BPE on task text (one token per digit and place) and save it.

    The full byte alphabet is kept, so any text round-trips; merges cover the task's words.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = _place_value_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel()]
        + [decoders.Replace(c, str(d)) for chars in (HUNDREDS, TENS) for d, c in enumerate(chars)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(n_rows, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM], model_max_length=1024,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
