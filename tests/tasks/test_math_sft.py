"""Math SFT data: loading and cleaning, exact assistant-only labels, length policy, caching, batches."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from stars.tasks.loading import DatasetLoadError
from stars.tasks.math_sft import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    ChatPieces,
    SFTData,
    build_sft_data,
    chat_prompt,
    load_sft_rows,
    tokenize_sft,
)


@pytest.fixture(scope="module")
def numina(fixtures_dir: Path) -> Path:
    return fixtures_dir / "numina" / "train.jsonl"


def _fixture_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_load_drops_empty_rows_and_maps_columns(numina: Path) -> None:
    rows = load_sft_rows(numina, seed=None)
    raw = _fixture_rows(numina)
    kept = [r for r in raw if r["problem"].strip() and r["solution"].strip()]
    assert len(raw) == 8 and len(rows) == len(kept) == 6
    assert rows.column_names == ["problem", "solution"]
    assert rows["problem"] == [r["problem"] for r in kept]


def test_column_mapping_from_the_spec(tmp_path: Path, numina: Path) -> None:
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(
        "".join(json.dumps({"question": r["problem"], "response": r["solution"]}) + "\n" for r in _fixture_rows(numina))
    )
    rows = load_sft_rows(renamed, problem_column="question", solution_column="response", seed=None)
    assert rows.column_names == ["problem", "solution"] and len(rows) == 6
    with pytest.raises(DatasetLoadError) as err:
        load_sft_rows(renamed)  # default columns problem/solution do not exist here
    assert "renamed.jsonl" in str(err.value) and "'problem'" in str(err.value)
    assert "'question'" in str(err.value) and "'response'" in str(err.value)


def test_seeded_shuffle_and_num_samples(numina: Path) -> None:
    a = load_sft_rows(numina, seed=74)
    assert a["problem"] == load_sft_rows(numina, seed=74)["problem"]
    assert sorted(a["problem"]) == sorted(load_sft_rows(numina, seed=None)["problem"])
    assert a["problem"] != load_sft_rows(numina, seed=None)["problem"]  # it did shuffle
    first3 = load_sft_rows(numina, seed=74, num_samples=3)
    assert first3["problem"] == a["problem"][:3]
    assert len(load_sft_rows(numina, num_samples=1000)) == 6  # more than exist: all of them


def test_all_empty_rows_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"problem": " ", "solution": "x"}) + "\n" + json.dumps({"problem": "p", "solution": ""}) + "\n")
    with pytest.raises(DatasetLoadError, match=r"blank\.jsonl.*no rows with a non-empty 'problem' and 'solution'"):
        load_sft_rows(path)


def test_chat_pieces_reproduce_the_template(tiny_tokenizer) -> None:
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert pieces.prompt(SYSTEM_PROMPT, "What is 2+2?") + "It is 4." + pieces.end == full
    assert pieces.end == "<|im_end|>\n"
    assert chat_prompt(tiny_tokenizer, "What is 2+2?") == pieces.prompt(SYSTEM_PROMPT, "What is 2+2?")
    assert chat_prompt(tiny_tokenizer, "Q").endswith("<|im_start|>assistant\n")


def test_labels_are_exactly_the_solution_and_end_of_turn(tiny_tokenizer, numina: Path) -> None:
    rows = load_sft_rows(numina, seed=None)
    tokenized = tokenize_sft(rows, tiny_tokenizer, max_seq_len=512)
    assert len(tokenized) == len(rows)
    for row, ex in zip(rows, tokenized, strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) == ex["length"]
        supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        assert [lab for lab in labels if lab != IGNORE_INDEX] == supervised  # labels are the token ids
        assert tiny_tokenizer.decode(supervised) == row["solution"].strip() + "<|im_end|>"
        # the supervised tokens are one contiguous block at the very end (no off-by-two)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert all(lab != IGNORE_INDEX for lab in labels[first:])
        assert ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
        # the unsupervised part is exactly the generation prompt used at inference
        prompt = tiny_tokenizer.decode(ids[:first])
        assert prompt == chat_prompt(tiny_tokenizer, row["problem"].strip())


def test_overlong_policy_drop_and_truncate(tiny_tokenizer, numina: Path) -> None:
    rows = load_sft_rows(numina, seed=None)
    full = tokenize_sft(rows, tiny_tokenizer, max_seq_len=4096)
    lengths = sorted(full["length"])
    limit = lengths[2]  # two rows fit, the rest are longer
    dropped = tokenize_sft(rows, tiny_tokenizer, max_seq_len=limit, overlong="drop")
    assert len(dropped) == sum(n <= limit for n in lengths)
    assert max(dropped["length"]) <= limit
    truncated = tokenize_sft(rows, tiny_tokenizer, max_seq_len=limit, overlong="truncate")
    assert len(truncated) == len(rows)
    assert max(truncated["length"]) == limit
    with pytest.raises(ValueError, match="overlong"):
        tokenize_sft(rows, tiny_tokenizer, overlong="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no SFT example fits"):
        tokenize_sft(rows, tiny_tokenizer, max_seq_len=3, overlong="drop")


def test_multiprocess_map_gives_the_same_examples(tiny_tokenizer, numina: Path) -> None:
    base = [r for r in _fixture_rows(numina) if r["problem"].strip() and r["solution"].strip()]
    in_memory = datasets.Dataset.from_list(  # in memory: nothing is read back from a cache
        [{"problem": f"{i}. {r['problem']}", "solution": r["solution"]} for i, r in enumerate(base * 10)]
    )
    one = tokenize_sft(in_memory, tiny_tokenizer, max_seq_len=512, num_proc=1, batch_size=16)
    two = tokenize_sft(in_memory, tiny_tokenizer, max_seq_len=512, num_proc=2, batch_size=16)
    assert len(one) == len(two) == 60
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


def test_tokenization_is_cached_on_disk(tiny_tokenizer, tmp_path: Path, numina: Path) -> None:
    rows = load_sft_rows(numina, seed=0)  # file-backed, so `map` writes its result next to the source
    first = tokenize_sft(rows, tiny_tokenizer, max_seq_len=512)
    assert first.cache_files and Path(first.cache_files[0]["filename"]).exists()
    again = tokenize_sft(rows, tiny_tokenizer, max_seq_len=512)
    assert again.cache_files == first.cache_files  # reloaded, not recomputed
    other = tokenize_sft(rows, tiny_tokenizer, max_seq_len=256)
    assert other.cache_files != first.cache_files  # a different option is a different cache entry


def test_sft_batches_follow_the_training_contract(tiny_tokenizer, numina: Path) -> None:
    data = build_sft_data(tiny_tokenizer, numina, max_seq_len=512, num_samples=4)
    assert len(data) == 4 and data.dropped == 0
    b = data.batch([2, 0])
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["input_ids"].dtype == torch.long
    lengths = b["attention_mask"].sum(1)
    assert b["input_ids"].shape[1] == int(lengths.max())
    short = int(lengths.argmin())
    n = int(lengths[short])
    assert (b["input_ids"][short, n:] == tiny_tokenizer.pad_token_id).all()
    assert (b["labels"][short, n:] == IGNORE_INDEX).all()
    assert (b["attention_mask"][short, :n] == 1).all()
    assert data.dataset[2]["input_ids"] == b["input_ids"][0, : int(lengths[0])].tolist()
    padded = SFTData(data.dataset, tiny_tokenizer.pad_token_id, pad_to_multiple_of=64)
    assert padded.batch([0])["input_ids"].shape[1] % 64 == 0


def test_build_from_model_directory_and_saved_dataset(tiny_tokenizer_dir: Path, tmp_path: Path, numina: Path) -> None:
    """The tokenizer comes from a model directory; the data from a saved `datasets` folder."""
    ds = datasets.load_dataset("json", data_files=str(numina), split="train")
    ds.save_to_disk(str(tmp_path / "saved"))
    data = build_sft_data(tiny_tokenizer_dir, tmp_path / "saved", max_seq_len=512)
    assert len(data) == 6


def _retemplated(tokenizer_dir: Path, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = template
    return tok


def test_unusable_chat_templates_fail_loudly(tiny_tokenizer_dir: Path, numina: Path) -> None:
    rows = load_sft_rows(numina, seed=None, num_samples=2)
    # the assistant turn does not simply follow the generation prompt
    moved = _retemplated(
        tiny_tokenizer_dir,
        "{% for m in messages %}{% if loop.last %}<last>{% endif %}{{ m['content'] }}\n{% endfor %}",
    )
    with pytest.raises(ValueError, match="assistant turn"):
        ChatPieces.from_tokenizer(moved)
    # no end-of-turn token to supervise
    no_eot = _retemplated(tiny_tokenizer_dir, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="end-of-turn token '<\\|im_end\\|>'"):
        tokenize_sft(rows, no_eot)
    # contents not inserted verbatim (caught on the first row of each batch)
    rewrites = _retemplated(
        tiny_tokenizer_dir,
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | replace('$', '') }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    with pytest.raises(ValueError, match="verbatim"):
        tokenize_sft(rows, rewrites)


def test_ouros_mislabelled_special_tokens_are_corrected_on_load(tiny_tokenizer_dir, tmp_path) -> None:
    """Ouro's upstream tokenizer config calls `<|endoftext|>` (id 0) PAD, BOS and EOS at once."""
    import json
    import shutil

    from stars.tasks.math_sft import load_tokenizer

    mislabelled = tmp_path / "ouro_tokenizer"
    shutil.copytree(tiny_tokenizer_dir, mislabelled)
    config = json.loads((mislabelled / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (mislabelled / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(mislabelled)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # a tokenizer with distinct labels is left as it is
    custom = tmp_path / "custom"
    shutil.copytree(tiny_tokenizer_dir, custom)
    config.update(bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(custom).eos_token_id == 0
