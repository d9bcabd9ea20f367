"""Load a table (a `datasets.Dataset`) by Hugging Face dataset id or local path, with clear errors.

Every source goes through `datasets`, so a local file and a hub id end up as the same arrow-backed,
fingerprinted `Dataset` (which is what makes `Dataset.map` caching work):
- a hub id, or a local directory of data files laid out like a hub repo (`test.jsonl`,
  `data/test-00000-of-00001.parquet`, ...): `datasets.load_dataset(source, config, split=split)`;
- a local file (`.jsonl`, `.json`, `.parquet`, `.csv`): `load_dataset("json"|"parquet"|"csv",
  data_files=path, split="train")`; a single file *is* the table, so `split` does not apply to it;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: `datasets.load_from_disk`.

Errors name the dataset, the split or column that is wrong, and what does exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stars.errors import UserError

if TYPE_CHECKING:
    import datasets

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetLoadError(UserError):
    """A dataset could not be loaded as asked (missing split, column, file, or no rows)."""


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def _split_names_from_error(err: Exception) -> str:
    m = re.search(r"one of (\[[^\]]*\])", str(err))
    return m.group(1) if m else f"(see the original error: {err})"


def _load_saved(path: Path, split: str | None) -> datasets.Dataset:
    import datasets

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.Dataset):
        return obj  # a single saved table: it is the split
    if split is None:
        if len(obj) == 1:
            return next(iter(obj.values()))
        raise DatasetLoadError(
            f"dataset {str(path)!r} has several splits {sorted(obj)}; choose one with `split`"
        )
    parts = [p.strip() for p in split.split("+")]
    missing = [p for p in parts if p not in obj]
    if missing:
        raise DatasetLoadError(
            f"dataset {str(path)!r} has no split {missing[0]!r}; splits that exist: {sorted(obj)}"
        )
    tables = [obj[p] for p in parts]
    return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)


def load_table(
    source: str | Path,
    split: str | None = "train",
    config: str | None = None,
    columns: Sequence[str] = (),
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split of a dataset as a `datasets.Dataset`; fail clearly if it is missing or empty.

    `split` accepts the `datasets` split syntax (`"train+test"`, `"test[:100]"`). `columns` are checked
    to exist (see `require_columns`).
    """
    import datasets

    name = str(source)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get("".join(path.suffixes[-1:]).lower())
            if builder is None:
                raise DatasetLoadError(
                    f"dataset {name!r}: unsupported file type {path.suffix!r}; "
                    f"use one of {sorted(_FILE_BUILDERS)} or a saved `datasets` folder"
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        elif _is_saved_dataset(path):
            ds = _load_saved(path, split)
        elif path.exists() and not path.is_dir():
            raise DatasetLoadError(f"dataset {name!r} is neither a file nor a folder")
        else:
            if not path.exists() and (name.startswith((".", "/", "~")) or name.endswith(tuple(_FILE_BUILDERS))):
                raise DatasetLoadError(f"dataset {name!r}: no such file or folder")
            ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except DatasetLoadError:
        raise
    except StopIteration as err:  # what the json builder raises on an empty file
        raise DatasetLoadError(f"dataset {name!r} (split {split!r}) has no rows") from err
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' message for an empty split
            raise DatasetLoadError(f"dataset {name!r} (split {split!r}) has no rows") from err
        if re.search(r"unknown split", str(err), re.IGNORECASE):
            raise DatasetLoadError(
                f"dataset {name!r} has no split {split!r}; splits that exist: {_split_names_from_error(err)}"
            ) from err
        raise DatasetLoadError(f"dataset {name!r} (config {config!r}, split {split!r}): {err}") from err
    except FileNotFoundError as err:
        raise DatasetLoadError(
            f"dataset {name!r} not found as a local path or on the Hugging Face hub "
            f"(no internet here? point the spec at a local copy): {err}"
        ) from err
    except Exception as err:  # connection errors, builder errors: keep the cause, name the dataset
        raise DatasetLoadError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): "
            f"{type(err).__name__}: {err}"
        ) from err
    if isinstance(ds, datasets.DatasetDict):  # split=None on a multi-split source
        if len(ds) != 1:
            raise DatasetLoadError(f"dataset {name!r} has several splits {sorted(ds)}; choose one with `split`")
        ds = next(iter(ds.values()))
    if len(ds) == 0:
        raise DatasetLoadError(
            f"dataset {name!r} (split {split!r}) has no rows; columns: {ds.column_names}"
        )
    require_columns(ds, columns, name)
    return ds


def require_columns(ds: datasets.Dataset, columns: Iterable[str], dataset_name: str) -> None:
    """Raise a `DatasetLoadError` naming the dataset, the missing column and the columns that exist."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DatasetLoadError(
            f"dataset {dataset_name!r} has no column {missing[0]!r}"
            + (f" (also missing: {missing[1:]})" if len(missing) > 1 else "")
            + f"; columns that exist: {ds.column_names}"
        )
