"""Math supervised fine-tuning data (docs/science.md, section 7): NuminaMath-style problem/solution pairs as
ChatML conversations, with the loss only on the assistant's tokens.

Pipeline: `load_sft_rows` (load by hub id or local path, map columns, strip, drop empty rows, seeded
shuffle, first `num_samples`) -> `tokenize_sft` (`Dataset.map`, batched, optionally multiprocess, cached
on disk next to the source's arrow files) -> `SFTData` (the training-data contract of docs/interfaces.md).

How the labels are made exact. The chat template is rendered once with sentinel strings in place of the
system prompt, the problem and the solution; that splits it into fixed text pieces. Each row is then
tokenized in three parts: the prompt (everything up to and including the generation prompt
`<|im_start|>assistant\\n`), the solution, and the end of turn (`<|im_end|>`). Labels are the solution's
and the end-of-turn token's ids, -100 on the prompt. Tokenizing the solution on its own is also exactly
what happens at inference, where the model generates it after the tokenized prompt. The newline that
ChatML writes after `<|im_end|>` is not included: it is never supervised and, as the last token, it
predicts nothing. The first row of every batch is checked against the tokenizer's own
`apply_chat_template`, so a template that does not insert contents verbatim fails loudly.

Length policy (`overlong`): "drop" (default) removes conversations longer than `max_seq_len` tokens,
so every kept example ends with its end-of-turn token; "truncate" cuts them to `max_seq_len` (the tail
of the solution and the end-of-turn token are lost; rows left with no supervised token are dropped).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stars.tasks.loading import DatasetLoadError, load_table
from stars.tasks.registry import TrainingData, TrainingTask, register

if TYPE_CHECKING:
    import datasets
    import torch

    from stars.spec import JobSpec

SYSTEM_PROMPT = "You are a helpful assistant that can assist users with reasoning."
IGNORE_INDEX = -100
DEFAULT_EOT = "<|im_end|>"
_FORMAT_VERSION = "stars-sft-v1"  # bump when the tokenized layout changes, to invalidate caches
_S_SYS, _S_USER, _S_ASSIST = "\x00STARS_SYS\x00", "\x00STARS_USER\x00", "\x00STARS_ASSIST\x00"

Overlong = Literal["drop", "truncate"]


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory (`AutoTokenizer`). An existing local path is read with
    `local_files_only=True`, so it never reaches for the hub; anything else is treated as a hub id.
    `trust_remote_code` lets the tokenizer run its own Python code (the spec's
    `model.trust_remote_code`); off by default."""
    from transformers import AutoTokenizer

    local = Path(model_dir).expanduser().exists()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=local, trust_remote_code=trust_remote_code)
    return correct_chatml_special_tokens(tokenizer)


# Ouro's real special tokens (docs/science.md, section 6): PAD 0, BOS 1, EOS 2.
_CHATML_SPECIALS = {"pad_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def correct_chatml_special_tokens(tokenizer: Any) -> Any:
    """Fix the special-token labels of a ChatML tokenizer that calls one token PAD, BOS and EOS at
    once (Ouro's upstream tokenizer config labels all three `<|endoftext|>`, id 0). Generation would
    then stop on the wrong token and SFT labels would end at it. Other tokenizers are returned as is."""
    labels = {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token}
    vocab = tokenizer.get_vocab()
    if len(labels) == 1 and all(token in vocab for token in _CHATML_SPECIALS.values()):
        tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = (
            _CHATML_SPECIALS["pad_token"], _CHATML_SPECIALS["bos_token"], _CHATML_SPECIALS["eos_token"]
        )
    return tokenizer


# --------------------------------------------------------------------------------------------- rows
def load_sft_rows(
    source: str | Path,
    split: str = "train",
    config: str | None = None,
    problem_column: str = "problem",
    solution_column: str = "solution",
    seed: int | None = 74,
    num_samples: int | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """A dataset with columns `problem` and `solution`: stripped, no empty rows, shuffled with `seed`
    (None = keep the source order), then the first `num_samples` rows (None = all)."""
    ds = load_table(source, split=split, config=config, columns=[problem_column, solution_column])
    ds = ds.select_columns([problem_column, solution_column])
    if problem_column != "problem" or solution_column != "solution":
        ds = ds.rename_columns({problem_column: "problem", solution_column: "solution"})

    def keep(batch: dict[str, list[Any]]) -> list[bool]:
        return [
            isinstance(p, str) and isinstance(s, str) and bool(p.strip()) and bool(s.strip())
            for p, s in zip(batch["problem"], batch["solution"], strict=True)
        ]

    n_raw = len(ds)
    ds = ds.filter(keep, batched=True, batch_size=10_000, num_proc=_procs(num_proc, n_raw), desc="drop empty rows")
    if len(ds) == 0:
        raise DatasetLoadError(
            f"dataset {str(source)!r} (split {split!r}) has no rows with a non-empty "
            f"{problem_column!r} and {solution_column!r} ({n_raw} rows before cleaning)"
        )
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if num_samples is not None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        ds = ds.select(range(min(num_samples, len(ds))))
    return ds


def _procs(num_proc: int | None, n_rows: int) -> int | None:
    """None (one process) for small tables; otherwise the requested count, or the CPU count (max 8)."""
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if n_rows >= 20_000 else 1
    num_proc = max(1, min(num_proc, n_rows))
    return None if num_proc == 1 else num_proc


# ---------------------------------------------------------------------------------------- template
@dataclass(frozen=True)
class ChatPieces:
    """The chat template split around its contents: prompt = pre + system + mid + problem + post (ends
    with the generation prompt); the assistant turn then is solution + end (the end-of-turn text)."""

    pre: str
    mid: str
    post: str
    end: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatPieces:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; SFT data needs one (ChatML for Ouro)")
        convo = [
            {"role": "system", "content": _S_SYS},
            {"role": "user", "content": _S_USER},
        ]
        prompt = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*convo, {"role": "assistant", "content": _S_ASSIST}], tokenize=False
        )
        if not (full.startswith(prompt) and full[len(prompt) :].startswith(_S_ASSIST)):
            raise ValueError(
                "the chat template does not render the assistant turn right after the generation prompt; "
                f"prompt={prompt!r}, full={full!r}"
            )
        if prompt.count(_S_SYS) != 1 or prompt.count(_S_USER) != 1:
            raise ValueError(f"the chat template does not insert the contents verbatim: {prompt!r}")
        pre, rest = prompt.split(_S_SYS)
        mid, post = rest.split(_S_USER)
        return cls(pre=pre, mid=mid, post=post, end=full[len(prompt) + len(_S_ASSIST) :])

    def prompt(self, system: str, problem: str) -> str:
        return self.pre + system + self.mid + problem + self.post


def chat_prompt(tokenizer: Any, question: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """Generation prompt text: system prompt, user question, then the assistant's opening."""
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
        tokenize=False,
        add_generation_prompt=True,
    )


class _TokenizeBatch:
    """The `Dataset.map` function (a class so it pickles for multiprocess map)."""

    def __init__(
        self, tokenizer: Any, system_prompt: str, max_seq_len: int, overlong: Overlong, eot_token: str
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_seq_len = max_seq_len
        self.overlong = overlong
        self.pieces = ChatPieces.from_tokenizer(tokenizer)
        eot_id = tokenizer.convert_tokens_to_ids(eot_token)
        end_ids = tokenizer(self.pieces.end, add_special_tokens=False)["input_ids"]
        if eot_id is None or eot_id not in end_ids:
            raise ValueError(
                f"end-of-turn token {eot_token!r} (id {eot_id}) is not in the template's turn ending "
                f"{self.pieces.end!r} (ids {end_ids})"
            )
        self.end_ids = end_ids[: end_ids.index(eot_id) + 1]  # up to and including <|im_end|>

    def _check_first(self, problem: str, solution: str) -> None:
        """The pieces must reproduce the tokenizer's own rendering of this conversation."""
        real = self.tokenizer.apply_chat_template(
            [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": problem},
                {"role": "assistant", "content": solution},
            ],
            tokenize=False,
        )
        ours = self.pieces.prompt(self.system_prompt, problem) + solution + self.pieces.end
        if real != ours:
            raise ValueError(
                "the chat template does not insert the contents verbatim for this row; "
                f"expected {ours[:200]!r}..., got {real[:200]!r}..."
            )

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        problems = [p.strip() for p in batch["problem"]]
        solutions = [s.strip() for s in batch["solution"]]
        if problems:
            self._check_first(problems[0], solutions[0])
        prompts = [self.pieces.prompt(self.system_prompt, p) for p in problems]
        enc = self.tokenizer
        prompt_ids = enc(prompts, add_special_tokens=False)["input_ids"]
        solution_ids = enc(solutions, add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
        for p_ids, s_ids in zip(prompt_ids, solution_ids, strict=True):
            target = list(s_ids) + self.end_ids
            ids = list(p_ids) + target
            labels = [IGNORE_INDEX] * len(p_ids) + target
            if len(ids) > self.max_seq_len:
                if self.overlong == "drop":
                    continue
                ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
                if all(x == IGNORE_INDEX for x in labels[1:]):
                    continue  # nothing left to learn from
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
        return out


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    return Hasher.hash([body, getattr(tokenizer, "chat_template", None)])


def tokenize_sft(
    rows: datasets.Dataset,
    tokenizer: Any,
    max_seq_len: int = 2048,
    overlong: Overlong = "drop",
    system_prompt: str = SYSTEM_PROMPT,
    eot_token: str = DEFAULT_EOT,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Tokenize `problem`/`solution` rows into `input_ids`, `labels` (-100 off the assistant turn) and
    `length`. Cached by `datasets` under a fingerprint of the rows, the tokenizer and every option."""
    import datasets
    from datasets.fingerprint import Hasher

    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    fn = _TokenizeBatch(tokenizer, system_prompt, max_seq_len, overlong, eot_token)
    fingerprint = Hasher.hash(
        [
            _FORMAT_VERSION,
            rows._fingerprint,
            _tokenizer_fingerprint(tokenizer),
            system_prompt,
            max_seq_len,
            overlong,
            eot_token,
        ]
    )
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )
    out = rows.map(
        fn,
        batched=True,
        batch_size=batch_size,
        num_proc=_procs(num_proc, len(rows)),
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=fingerprint,
        desc="tokenize SFT",
    )
    if len(out) == 0:
        raise ValueError(
            f"no SFT example fits max_seq_len={max_seq_len} with overlong={overlong!r} "
            f"({len(rows)} rows before tokenization)"
        )
    return out


# ------------------------------------------------------------------------------------ training data
class SFTData:
    """Training data (docs/interfaces.md contract) over a tokenized SFT dataset: `len()` and
    `batch(indices)` -> right-padded `input_ids`, `attention_mask`, `labels` (-100 on padding)."""

    def __init__(
        self, dataset: datasets.Dataset, pad_token_id: int, pad_to_multiple_of: int | None = None
    ) -> None:
        missing = {"input_ids", "labels"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"SFTData needs a tokenized dataset; missing columns {sorted(missing)}")
        if pad_token_id is None:
            raise ValueError("SFTData needs a pad_token_id")
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.dropped = 0  # rows removed by the length policy (set by build_sft_data)

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        idx = [int(i) for i in indices]
        rows = self.dataset[idx]
        width = max(len(r) for r in rows["input_ids"])
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(idx)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            k = len(ids)
            input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
            labels[i, :k] = torch.tensor(lab, dtype=torch.long)
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_sft_data(
    tokenizer: Any,
    source: str | Path,
    split: str = "train",
    config: str | None = None,
    problem_column: str = "problem",
    solution_column: str = "solution",
    seed: int | None = 74,
    num_samples: int | None = None,
    max_seq_len: int = 2048,
    overlong: Overlong = "drop",
    system_prompt: str = SYSTEM_PROMPT,
    num_proc: int | None = None,
) -> SFTData:
    """Load, clean, shuffle, tokenize and wrap: the whole SFT data path from a spec's fields.

    `tokenizer` is a tokenizer object or a model directory (loaded with `AutoTokenizer`).
    """
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    rows = load_sft_rows(
        source, split, config, problem_column, solution_column, seed, num_samples, num_proc
    )
    tokenized = tokenize_sft(
        rows, tokenizer, max_seq_len, overlong, system_prompt, num_proc=num_proc
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = SFTData(tokenized, pad)
    data.dropped = len(rows) - len(tokenized)
    return data


# ---- registration (stars.tasks.registry) ---------------------------------------------------------------
def build_training(spec: JobSpec) -> TrainingData:
    """The training data of a job whose `data.task` is math_sft, tokenized with `data.tokenizer` or the
    checkpoint's own tokenizer (`trust_remote_code` only when the spec's model asks for it)."""
    from stars.spec import CheckpointModel

    data, model = spec.data, spec.model
    checkpoint = model if isinstance(model, CheckpointModel) else None
    tokenizer = load_tokenizer(
        data.tokenizer or checkpoint.pretrained,  # the spec requires data.tokenizer for a new LoopLM
        trust_remote_code=checkpoint is not None and checkpoint.trust_remote_code,
    )
    sft = build_sft_data(
        tokenizer, data.dataset, split=data.split, config=data.config,
        problem_column=data.problem_column, solution_column=data.solution_column,
        seed=data.shuffle_seed, num_samples=data.num_samples, max_seq_len=data.max_seq_len,
        overlong=data.length_policy, system_prompt=data.system_prompt, num_proc=data.num_proc,
    )
    vocab = tokenizer.get_vocab()
    eos = tokenizer.convert_tokens_to_ids(DEFAULT_EOT) if DEFAULT_EOT in vocab else tokenizer.eos_token_id
    description = {"task": "math_sft", "dataset": data.dataset}
    return TrainingData(sft, len(tokenizer), sft.pad_token_id, eos, tokenizer.bos_token_id, description,
                        tokenizer=tokenizer)


register(TrainingTask("math_sft", build_training))
