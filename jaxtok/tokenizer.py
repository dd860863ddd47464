"""Loading a checkpoint's tokenizer through transformers (no torch needed)."""

from __future__ import annotations

from jaxtok.errors import JaxtokError
from jaxtok.hf_io import resolve_model_dir


def load_tokenizer(path_or_id: str):
    model_dir = resolve_model_dir(path_or_id)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise JaxtokError(f"could not load a tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
