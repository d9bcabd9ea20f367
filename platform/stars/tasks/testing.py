"""A tiny, real chat tokenizer built locally, for tests and benchmarks.

Tests must never download from the Hugging Face hub, yet the math code has to run through the same
`AutoTokenizer` / chat-template path as a real model directory (Ouro's ChatML tokenizer). This module
trains a small byte-level BPE with `tokenizers`, gives it Ouro's special-token layout
(PAD 0 `<|endoftext|>`, BOS 1 `<|im_start|>`, EOS 2 `<|im_end|>`) and a ChatML template, and saves
it as a model directory that `AutoTokenizer.from_pretrained` loads like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_DEFAULT_CORPUS = (
    "You are a helpful assistant that can assist users with reasoning.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is 72.",
    "Let $x$ be a real number such that $x^2 + 2x + 1 = 0$. Then $(x+1)^2 = 0$, so $x = -1$.",
    "We compute $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$. Therefore the answer is $\\boxed{\\frac{5}{6}}$.",
    "The total cost is $1,250.50 dollars, which is 3.5 times the price of 12 apples.",
    "Solve for $n$: $2^n = 1024$, hence $n = 10$ and $\\sqrt{n^2} = 10$. So the final answer is 10.",
    "0123456789 + - * / = ( ) [ ] { } < > . , ; : ! ? % # & ^ _ | ~ ' \" \\ \n\t",
)


UNK_TOKEN = "<unk>"


def _character_tokenizer(corpus: list[str], vocab_size: int):
    """Ouro's special tokens, `<unk>`, then the corpus's most frequent characters up to `vocab_size`
    tokens, no merges: small enough for a tiny model's vocabulary (the Ouro test fixture has 97)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models

    chars = Counter(ch for text in corpus for ch in text)
    keep = [ch for ch, _ in chars.most_common(vocab_size - len(SPECIAL_TOKENS) - 1)]
    vocab = {name: i for i, name in enumerate((*SPECIAL_TOKENS, UNK_TOKEN, *keep))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    tok.decoder = decoders.Fuse()  # characters back to text without separators
    return tok


def _byte_level_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def build_tiny_chat_tokenizer(
    out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 400, *, byte_level: bool = True
) -> Path:
    """Train a tokenizer on `texts`, save it with a ChatML template into `out_dir`, return the dir.

    `byte_level` (default): a byte-level BPE, which decodes every string back exactly (the SFT label
    test relies on that); it needs more than 256 tokens. Otherwise a character vocabulary of at most
    `vocab_size` tokens, with `<unk>` for characters left out, for models with tiny vocabularies.
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = list(texts) if texts is not None else list(_DEFAULT_CORPUS)
    if byte_level:
        tok = _byte_level_tokenizer(corpus, vocab_size)
    else:  # the template's own characters must be in the vocabulary
        tok = _character_tokenizer([*corpus, CHATML_TEMPLATE, "system\nuser\nassistant\n"], vocab_size)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name!r} got id {tok.token_to_id(name)}, expected {i}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None if byte_level else UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    return out
