"""Finding and reading the files of a Hugging Face checkpoint, without torch.

A checkpoint is a local directory or a Hub id (downloaded only when the Hub is reachable or already cached). Weights
come from `model.safetensors` or from the shards that `model.safetensors.index.json` lists, read through safetensors'
numpy backend (bfloat16 arrives as `ml_dtypes.bfloat16`). Pickled `.bin` weights can run code when loaded, so they
are read only when the caller opts in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Collection, Iterator, Optional

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxtok.errors import JaxtokError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_model_dir(path_or_id: str | os.PathLike, what: str = "model") -> Path:
    """A local checkpoint directory, or the local snapshot of a Hub repository; errors call it a `what` directory."""
    path_or_id = str(path_or_id)
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise JaxtokError(f"{what} path {path} is a file; pass the checkpoint's directory")
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if looks_local:
        raise JaxtokError(f"{what} directory {path} does not exist; pass a {what} directory or a Hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "not available here"
        raise JaxtokError(
            f"{path_or_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); download it first or pass a local checkpoint directory"
        ) from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise JaxtokError(f"{path.parent} has no {path.name}; is it a Hugging Face {what} directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxtokError(f"{path} is not valid JSON ({e})") from None


def weight_files(model_dir: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files holding the checkpoint's weights (pickles only with `allow_pickle`)."""
    if (model_dir / SAFETENSORS_INDEX).is_file():
        index = read_json(model_dir / SAFETENSORS_INDEX, "model")
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise JaxtokError(f"{model_dir / SAFETENSORS_INDEX} lists no weight files")
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise JaxtokError(f"{model_dir} lacks shards listed in {SAFETENSORS_INDEX}: {', '.join(missing)}")
        return [model_dir / n for n in names]
    if (model_dir / SAFETENSORS).is_file():
        return [model_dir / SAFETENSORS]
    pickles = [model_dir / n for n in PICKLES if (model_dir / n).is_file()]
    if pickles and not allow_pickle:
        raise JaxtokError(
            f"{model_dir} has only pickled weights ({pickles[0].name}), which can run code when loaded; convert them "
            "to safetensors, or opt in with allow_pickle=True (--allow-pickle) if you trust the source"
        )
    if pickles:
        return _pickle_files(model_dir)
    raise JaxtokError(f"{model_dir} has no weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


def _pickle_files(model_dir: Path) -> list[Path]:
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        return [model_dir / n for n in sorted(set(read_json(index, "model")["weight_map"].values()))]
    return [model_dir / "pytorch_model.bin"]


def iter_tensors(files: list[Path], names: Optional[Collection[str]] = None) -> Iterator[tuple[str, Path, np.ndarray]]:
    """Yields (name, file, array) one tensor at a time, so peak host memory is one tensor, not the model; with
    `names`, only those tensors (safetensors files read only their bytes)."""
    for path in files:
        if path.suffix == ".bin":
            yield from ((n, p, a) for n, p, a in _iter_pickle(path) if names is None or n in names)
            continue
        if os.path.getsize(path) < 8:
            raise JaxtokError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes); download it again")
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    if names is not None and name not in names:
                        continue
                    # get_slice reads bfloat16 into ml_dtypes, which get_tensor's numpy path cannot.
                    yield name, path, f.get_slice(name)[:]
        except SafetensorError as e:
            raise JaxtokError(f"{path} is truncated or corrupt ({e}); download it again") from None


def _iter_pickle(path: Path):
    try:
        import torch
    except ImportError:
        raise JaxtokError(f"reading {path.name} needs torch; convert the checkpoint to safetensors instead") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise JaxtokError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); download it again") from None
    for name, t in state.items():
        yield name, path, t.float().numpy()
