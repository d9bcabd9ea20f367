"""Load and save a model the platform can loop: a LoopLM directory or an Ouro checkpoint.

`load_pretrained` reads `config.json` and dispatches on `model_type`: `looplm` (saved by this
platform) through transformers' `from_pretrained`, `ouro` through `stars.model.ouro.load_ouro` (no
remote code: Ouro's layout is a LoopLM configuration, docs/science.md section 6). A name that is not a
local path is a Hugging Face hub id, downloaded once into the hub cache (`snapshot_download`).

`save_model` is its inverse: an Ouro-derived model goes back to disk in Ouro's layout, anything else
with `save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stars.errors import UserError
from stars.model.config import LoopLMConfig
from stars.model.looplm import LoopLM
from stars.model.ouro import is_ouro_derived, load_ouro, save_ouro

__all__ = ["PretrainedModelError", "load_pretrained", "resolve_model_dir", "save_model"]

# What a hub snapshot needs: config, weights, tokenizer files and chat template (no remote code).
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_KNOWN_TYPES = (LoopLMConfig.model_type, "ouro")


class PretrainedModelError(UserError):
    """A model path or hub id that does not hold a model this platform can load."""


def resolve_model_dir(name: str | Path) -> Path:
    """The local directory of a model: `name` itself when it exists, else a hub snapshot of it."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise PretrainedModelError(f"model {str(name)!r} is a file; expected a model directory")
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), allow_patterns=_HUB_FILES))
    except Exception as exc:  # offline, unknown repo, bad id: one message that says which
        raise PretrainedModelError(
            f"model {str(name)!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); give a "
            f"local path, or set HF_HOME to a cache that holds it"
        ) from None


def model_type_of(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        raise PretrainedModelError(
            f"{str(directory)!r} is not a model directory: no config.json (found "
            f"{sorted(p.name for p in directory.iterdir())[:10]})"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise PretrainedModelError(f"{config}: not valid JSON ({exc})") from None
    if model_type not in _KNOWN_TYPES:
        raise PretrainedModelError(
            f"{config}: model_type {model_type!r}; expected one of {', '.join(_KNOWN_TYPES)} (a LoopLM saved "
            f"by this platform or an Ouro checkpoint)"
        )
    return model_type


def load_pretrained(name: str | Path, dtype: torch.dtype | None = None) -> LoopLM:
    """The LoopLM in directory or hub id `name`, in eval mode, weights in `dtype` (None: as saved)."""
    directory = resolve_model_dir(name)
    if model_type_of(directory) == "ouro":
        return load_ouro(directory, dtype)
    return LoopLM.from_pretrained(str(directory), dtype=dtype or "auto").eval()


def save_model(model: LoopLM, path: str | Path) -> Path:
    """Write `model` where `load_pretrained` reads it back: Ouro's layout for a model loaded from
    Ouro (so the original code and vLLM read STARS checkpoints), else `save_pretrained`."""
    out = Path(path)
    if is_ouro_derived(model):
        return save_ouro(model, out)
    model.save_pretrained(out)
    return out
