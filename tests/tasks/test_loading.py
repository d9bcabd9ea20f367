"""Loading tables by local path through `datasets`, and the errors for wrong columns/splits/empty data."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from stars.tasks.loading import DatasetLoadError, load_table, require_columns


def test_jsonl_file_loads_through_datasets(fixtures_dir: Path) -> None:
    ds = load_table(fixtures_dir / "gsm8k" / "test.jsonl", split="test")  # a file is the whole table
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == 5
    assert ds.column_names == ["question", "answer"]
    assert ds.cache_files, "local files must become arrow-backed (cacheable) datasets"


def test_json_and_parquet_files(tmp_path: Path, fixtures_dir: Path) -> None:
    src = load_table(fixtures_dir / "svamp" / "test.jsonl")
    src.to_json(tmp_path / "svamp.json", lines=False)
    src.to_parquet(tmp_path / "svamp.parquet")
    for name in ("svamp.json", "svamp.parquet"):
        ds = load_table(tmp_path / name)
        assert ds["Answer"] == src["Answer"], name
        assert ds.column_names == src.column_names


def test_hub_like_folder_takes_the_load_dataset_path(tmp_path: Path, fixtures_dir: Path) -> None:
    """A folder of split files is loaded by `datasets.load_dataset(folder, split=...)`, as a hub id is."""
    shutil.copytree(fixtures_dir / "svamp", tmp_path / "svamp")
    train = load_table(tmp_path / "svamp", split="train")
    both = load_table(tmp_path / "svamp", split="train+test")
    assert (len(train), len(both)) == (2, 5)
    hub_layout = tmp_path / "hub" / "data"
    hub_layout.mkdir(parents=True)
    train.to_parquet(hub_layout / "train-00000-of-00001.parquet")
    assert load_table(tmp_path / "hub", split="train")["ID"] == train["ID"]


def test_saved_dataset_folders(tmp_path: Path, fixtures_dir: Path) -> None:
    ds = load_table(fixtures_dir / "amc23" / "test.jsonl")
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert load_table(tmp_path / "single", split="test")["answer"] == ds["answer"]
    assert load_table(tmp_path / "dict", split="test")["answer"] == ds["answer"]
    with pytest.raises(DatasetLoadError, match=r"has no split 'train'; splits that exist: \['test'\]"):
        load_table(tmp_path / "dict", split="train")


def test_missing_split_names_dataset_split_and_existing_splits(tmp_path: Path, fixtures_dir: Path) -> None:
    shutil.copytree(fixtures_dir / "svamp", tmp_path / "svamp")
    with pytest.raises(DatasetLoadError) as err:
        load_table(tmp_path / "svamp", split="validation")
    msg = str(err.value)
    assert "svamp" in msg and "'validation'" in msg
    assert "train" in msg and "test" in msg


def test_wrong_column_names_dataset_column_and_existing_columns(fixtures_dir: Path) -> None:
    path = fixtures_dir / "numina" / "train.jsonl"
    with pytest.raises(DatasetLoadError) as err:
        load_table(path, columns=["problem", "solutions"])
    msg = str(err.value)
    assert str(path) in msg
    assert "'solutions'" in msg
    assert "'problem_type'" in msg and "'solution'" in msg  # the columns that do exist


def test_require_columns_accepts_present_columns(fixtures_dir: Path) -> None:
    ds = load_table(fixtures_dir / "asdiv" / "validation.jsonl")
    require_columns(ds, ["body", "question", "answer"], "asdiv")  # no error
    with pytest.raises(DatasetLoadError, match="'Body'"):
        require_columns(ds, ["Body"], "asdiv")


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetLoadError, match=r"empty\.jsonl.*no rows"):
        load_table(empty)
    table = tmp_path / "empty.parquet"  # a schema but no rows
    datasets.Dataset.from_dict({"problem": ["x"], "solution": ["y"]}).select([]).to_parquet(table)
    with pytest.raises(DatasetLoadError, match=r"empty\.parquet.*no rows"):
        load_table(table)


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DatasetLoadError, match="no such file"):
        load_table(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DatasetLoadError, match="unsupported file type '.txt'"):
        load_table(tmp_path / "data.txt")
