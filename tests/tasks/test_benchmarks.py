"""The five math benchmarks: each reads its fixture (the source's real field layout) through the same
loader as a hub id, builds questions and gold answers, and makes chat prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from stars.tasks.answers import answers_match, is_correct
from stars.tasks.benchmarks import (
    BENCHMARKS,
    build_prompts,
    encode_prompts,
    format_number,
    get_benchmark,
    load_benchmark,
)
from stars.tasks.loading import DatasetLoadError
from stars.tasks.math_sft import SYSTEM_PROMPT

EXPECTED_GOLDS = {
    "gsm8k": ["36", "1335", "17.5", "-6", "7500"],
    "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}", "10", "5\\sqrt{2}", "0.5"],
    "asdiv": ["9", "15", "0.75", "7"],  # the multi-answer row ("5 (cats); 3 (dogs)") is skipped
    "svamp": ["5", "42", "8", "2.5", "31"],  # train + test
    "amc23": ["27", "36", "3"],
}


def test_registry_matches_the_reference() -> None:
    assert set(BENCHMARKS) == {"gsm8k", "math500", "asdiv", "svamp", "amc23"}
    ids = {name: (b.dataset_id, b.config, b.split) for name, b in BENCHMARKS.items()}
    assert ids == {
        "gsm8k": ("openai/gsm8k", "main", "test"),
        "math500": ("HuggingFaceH4/MATH-500", None, "test"),
        "asdiv": ("EleutherAI/asdiv", None, "validation"),
        "svamp": ("ChilleD/SVAMP", None, "train+test"),
        "amc23": ("math-ai/amc23", None, "test"),
    }
    with pytest.raises(KeyError, match="unknown benchmark 'mmlu'"):
        get_benchmark("mmlu")


def test_hub_ids_take_the_same_load_dataset_call(monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path) -> None:
    """Without a network, stand in for the hub at `datasets.load_dataset`: the registry's id, config and
    split must arrive there, and the rows come back through the same code as a local folder."""
    real = datasets.load_dataset
    calls = []
    local = {b.dataset_id: fixtures_dir / name for name, b in BENCHMARKS.items()}

    def hub(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return real(str(local[path]), split=split, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    golds = {name: [it.gold for it in load_benchmark(name)] for name in BENCHMARKS}
    assert golds == EXPECTED_GOLDS
    assert sorted(calls) == sorted((b.dataset_id, b.config, b.split) for b in BENCHMARKS.values())


@pytest.mark.parametrize("name", sorted(EXPECTED_GOLDS))
def test_fixture_golds(name: str, fixtures_dir: Path) -> None:
    items = load_benchmark(name, path=fixtures_dir / name)
    assert [it.gold for it in items] == EXPECTED_GOLDS[name]
    assert all(it.benchmark == name and it.question for it in items)
    for it in items:  # every gold parses and matches itself under math-verify
        assert answers_match(it.gold, it.gold), it.gold


def test_questions_are_built_from_the_right_fields(fixtures_dir: Path) -> None:
    asdiv = load_benchmark("asdiv", path=fixtures_dir / "asdiv")
    assert asdiv[0].question == "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    assert [it.index for it in asdiv] == [0, 1, 2, 4]
    svamp = load_benchmark("svamp", path=fixtures_dir / "svamp", split="test")
    assert svamp[0].question == "A baker made 19 cakes and sold 11 of them. How many cakes are left?"
    assert len(svamp) == 3  # split="test" gives the 300-problem variant's layout
    gsm = load_benchmark("gsm8k", path=fixtures_dir / "gsm8k", limit=2)
    assert len(gsm) == 2 and gsm[1].question.startswith("A library has 1,200 books.")
    amc = load_benchmark("amc23", path=fixtures_dir / "amc23" / "test.jsonl")  # a single file works too
    assert amc[0].question.startswith("Cities $A$ and $B$")


def test_amc23_accepts_a_problem_column(tmp_path: Path, fixtures_dir: Path) -> None:
    ds = datasets.load_dataset("json", data_files=str(fixtures_dir / "amc23" / "test.jsonl"), split="train")
    ds.rename_column("question", "problem").to_parquet(tmp_path / "amc.parquet")
    items = load_benchmark("amc23", path=tmp_path / "amc.parquet")
    assert [it.gold for it in items] == ["27", "36", "3"]


def test_hub_like_parquet_layout_and_saved_folder(tmp_path: Path, fixtures_dir: Path) -> None:
    ds = datasets.load_dataset("json", data_files=str(fixtures_dir / "math500" / "test.jsonl"), split="train")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    assert [it.gold for it in load_benchmark("math500", path=tmp_path / "hub")] == EXPECTED_GOLDS["math500"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_benchmark("math500", path=tmp_path / "saved")) == 5


def test_wrong_layout_names_benchmark_column_and_existing_columns(tmp_path: Path, fixtures_dir: Path) -> None:
    shutil.copy(fixtures_dir / "gsm8k" / "test.jsonl", tmp_path / "test.jsonl")
    with pytest.raises(DatasetLoadError) as err:
        load_benchmark("svamp", path=tmp_path / "test.jsonl")
    msg = str(err.value)
    assert "svamp" in msg and "'Body'" in msg and "['question', 'answer']" in msg
    with pytest.raises(DatasetLoadError, match=r"no split 'validation'.*\['test'\]"):
        load_benchmark("asdiv", path=_only_test_split(tmp_path, fixtures_dir))


def _only_test_split(tmp_path: Path, fixtures_dir: Path) -> Path:
    folder = tmp_path / "asdiv_wrong_split"
    folder.mkdir()
    shutil.copy(fixtures_dir / "asdiv" / "validation.jsonl", folder / "test.jsonl")
    return folder


def test_format_number() -> None:
    assert format_number(8.0) == "8"
    assert format_number(2.5) == "2.5"
    assert format_number(-3) == "-3"
    assert format_number(" 1,000 ") == "1,000"
    with pytest.raises(ValueError):
        format_number(float("nan"))


def test_prompts_use_the_chat_template_and_system_prompt(tiny_tokenizer, fixtures_dir: Path) -> None:
    items = load_benchmark("gsm8k", path=fixtures_dir / "gsm8k", limit=2)
    prompts = build_prompts(tiny_tokenizer, items)
    assert prompts[0] == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{items[0].question}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = encode_prompts(tiny_tokenizer, items)
    assert ids[0][0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tiny_tokenizer.decode(ids[1]) == prompts[1]


def test_end_to_end_scoring_of_fake_generations(fixtures_dir: Path) -> None:
    items = load_benchmark("gsm8k", path=fixtures_dir / "gsm8k")
    outputs = [
        "She sells 12 loaves for $3 each, so she earns $36.",
        "The library has 1,335 books. The answer is 1,335.",
        "He has \\boxed{\\$17.50} left.",
        "The temperature was 6 degrees below zero: \\boxed{6}",  # sign dropped: wrong
        "",  # nothing generated
    ]
    assert [is_correct(o, it.gold) for o, it in zip(outputs, items, strict=True)] == [True, True, True, False, False]
