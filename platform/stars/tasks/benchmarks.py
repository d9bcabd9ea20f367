"""The five math benchmarks of the paper (docs/science.md, section 8) as data: where each lives, which split,
how to build the question and how to read the gold answer from its own field layout.

`load_benchmark(name, path=None)` reads the hub id, or a local copy with the same fields (a jsonl /
json / parquet file, a folder of split files like `test.jsonl`, or a saved `datasets` folder), through
the same `stars.tasks.loading.load_table` call. A local path replaces both the dataset id and the
config; a single file is the whole table, so the split does not apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stars.tasks.answers import is_correct, last_boxed
from stars.tasks.loading import DatasetLoadError, load_table
from stars.tasks.math_sft import SYSTEM_PROMPT, chat_prompt
from stars.tasks.registry import EvalInputError, GenerativeTask, register

Row = Mapping[str, Any]


@dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation problem: the question shown to the model, the gold answer, and its row index."""

    question: str
    gold: str
    index: int
    benchmark: str = ""


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives and how to read it. `columns` lists required fields; a tuple inside it
    means "one of these" (AMC23 copies name the question `question` or `problem`)."""

    name: str
    dataset_id: str
    config: str | None
    split: str
    question: Callable[[Row], str]
    gold: Callable[[Row], str | None]
    columns: tuple[str | tuple[str, ...], ...]
    notes: str = ""
    size: int | None = field(default=None, compare=False)


def format_number(value: Any) -> str:
    """Gold numbers as text: 8.0 -> "8", 2.5 -> "2.5", "1,000" stays text for the parser."""
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a gold answer: {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"gold answer is not finite: {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


def _gsm8k_gold(row: Row) -> str | None:
    answer = str(row["answer"])
    if "####" not in answer:
        return None
    return answer.split("####")[-1].strip().replace(",", "")


def _math500_gold(row: Row) -> str | None:
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    return last_boxed(str(row.get("solution") or ""))


def _asdiv_gold(row: Row) -> str | None:
    answer = str(row["answer"]).strip()
    if ";" in answer:  # several answers ("5 (apples); 3 (pears)"): not scorable as one value
        return None
    return answer.split(" (")[0].strip() or None


def _first_present(row: Row, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise KeyError(names[0])


def _join(*parts: Any) -> str:
    return " ".join(str(p).strip() for p in parts if p is not None and str(p).strip())


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            name="gsm8k",
            dataset_id="openai/gsm8k",
            config="main",
            split="test",
            question=lambda r: str(r["question"]).strip(),
            gold=_gsm8k_gold,
            columns=("question", "answer"),
            notes="gold = text after '####' in answer, commas removed",
            size=1319,
        ),
        Benchmark(
            name="math500",
            dataset_id="HuggingFaceH4/MATH-500",
            config=None,
            split="test",
            question=lambda r: str(r["problem"]).strip(),
            gold=_math500_gold,
            columns=("problem", ("answer", "solution")),
            notes="gold = answer, else the last \\boxed{} of solution",
            size=500,
        ),
        Benchmark(
            name="asdiv",
            dataset_id="EleutherAI/asdiv",
            config=None,
            split="validation",
            question=lambda r: _join(r["body"], r["question"]),
            gold=_asdiv_gold,
            columns=("body", "question", "answer"),
            notes="question = body + ' ' + question; gold = answer before ' ('; rows with ';' dropped",
            size=2305,
        ),
        Benchmark(
            name="svamp",
            dataset_id="ChilleD/SVAMP",
            config=None,
            split="train+test",
            question=lambda r: _join(r["Body"], r["Question"]),
            gold=lambda r: format_number(r["Answer"]),
            columns=("Body", "Question", "Answer"),
            notes="all 1000 problems (train 700 + test 300); use split='test' for the 300-problem variant",
            size=1000,
        ),
        Benchmark(
            name="amc23",
            dataset_id="math-ai/amc23",
            config=None,
            split="test",
            question=lambda r: str(_first_present(r, ("question", "problem"))).strip(),
            gold=lambda r: format_number(r["answer"]),
            columns=(("question", "problem"), "answer"),
            size=40,
        ),
    )
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}") from None


def _check_columns(bench: Benchmark, column_names: list[str], source: str) -> None:
    for col in bench.columns:
        options = (col,) if isinstance(col, str) else col
        if not any(o in column_names for o in options):
            wanted = " or ".join(repr(o) for o in options)
            raise DatasetLoadError(
                f"dataset {source!r} (benchmark {bench.name}) has no column {wanted}; "
                f"columns that exist: {column_names}"
            )


def load_benchmark(
    name: str,
    path: str | Path | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> list[BenchmarkItem]:
    """The benchmark's problems in source order (first `limit` if given). Rows without a usable gold
    answer (ASDiv multi-answer rows, GSM8K rows without '####') are skipped."""
    bench = get_benchmark(name)
    source = str(path) if path is not None else bench.dataset_id
    config = None if path is not None else bench.config
    ds = load_table(source, split=split or bench.split, config=config)
    _check_columns(bench, ds.column_names, source)
    items: list[BenchmarkItem] = []
    for i, row in enumerate(ds):
        gold = bench.gold(row)
        if gold is None or not str(gold).strip():
            continue
        items.append(BenchmarkItem(question=bench.question(row), gold=str(gold), index=i, benchmark=bench.name))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DatasetLoadError(f"dataset {source!r} (benchmark {bench.name}) has no row with a gold answer")
    return items


def build_prompts(
    tokenizer: Any, items: list[BenchmarkItem], system_prompt: str = SYSTEM_PROMPT
) -> list[str]:
    """Chat prompts for generation (system prompt, user question, assistant opening), 0-shot."""
    return [chat_prompt(tokenizer, it.question, system_prompt) for it in items]


def encode_prompts(
    tokenizer: Any, items: list[BenchmarkItem], system_prompt: str = SYSTEM_PROMPT
) -> list[list[int]]:
    """Token ids of `build_prompts` (no extra special tokens: the template already has them)."""
    texts = build_prompts(tokenizer, items, system_prompt)
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]



# ---- registration (stars.tasks.registry) ---------------------------------------------------------------
def _loader(name: str) -> Callable[[str | None, int | None], list[BenchmarkItem]]:
    def load(path: str | None, limit: int | None) -> list[BenchmarkItem]:
        try:
            return load_benchmark(name, path, limit=limit)
        except DatasetLoadError as exc:
            raise EvalInputError(str(exc)) from None

    return load


def _prompts(tokenizer: Any, items: list[BenchmarkItem], system_prompt: str | None) -> list[list[int]]:
    return encode_prompts(tokenizer, items, system_prompt or SYSTEM_PROMPT)


def _judge(text: str, item: BenchmarkItem) -> bool:
    return is_correct(text, item.gold)


for _name in BENCHMARKS:
    register(GenerativeTask(_name, trained_on="math_sft", load=_loader(_name), prompts=_prompts, judge=_judge))
