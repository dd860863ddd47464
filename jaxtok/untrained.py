"""Finding the rows of a checkpoint's embedding (and untied head) that pretraining never trained.

Llama 3 base models ship special tokens that pretraining never used: the chat-template tokens (`<|eot_id|>`,
`<|start_header_id|>`, ...) and the reserved ones. Their embedding rows stayed at zero, or within rounding of it. A
fine-tune that uses such a token must train its row, and LoRA alone cannot.

The criterion, per matrix (the embedding, and the head when it is not tied to the embedding):

    a row is untrained when its L2 norm is 0, or at most RATIO (1e-3) times the median L2 norm of the matrix's rows.

Trained rows sit within a small factor of the median, however rare their token; untrained ones are zero or orders of
magnitude below it. The median, not the mean, so that many untrained rows cannot lower the bar they are measured by.
A token is untrained when either of its rows is. The check reads these two matrices straight from the checkpoint's
files, never the whole model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from jaxtok.errors import JaxtokError
from jaxtok.hf_io import iter_tensors, read_json, resolve_model_dir, weight_files
from jaxtok.llama_config import LlamaConfig

RATIO = 1e-3
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # HF names, both [V, D]


@dataclasses.dataclass(frozen=True)
class Untrained:
    """The untrained rows of one checkpoint, and every row's norm relative to its matrix's median."""

    embed_ids: tuple[int, ...]
    head_ids: tuple[int, ...]  # empty for a tied head, which is the embedding
    embed_norms: np.ndarray  # [V] norm / median norm
    head_norms: Optional[np.ndarray]  # [V], None when tied

    @property
    def ids(self) -> tuple[int, ...]:
        """Tokens with an untrained row in either matrix, in id order."""
        return tuple(sorted(set(self.embed_ids) | set(self.head_ids)))


def relative_norms(rows_VD: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """[V] float32: each row's L2 norm over the median row norm (inf where the median is 0 and the row is not)."""
    norms_V = np.concatenate([np.linalg.norm(rows_VD[i : i + chunk].astype(np.float32), axis=1)
                              for i in range(0, len(rows_VD), chunk)])  # chunks: no float32 copy of a bf16 matrix
    median = float(np.median(norms_V))
    if median == 0.0:
        return np.where(norms_V == 0.0, 0.0, np.inf).astype(np.float32)
    return norms_V / median


def find_untrained(embed_VD: np.ndarray, head_VD: Optional[np.ndarray] = None, ratio: float = RATIO) -> Untrained:
    """The untrained rows of an embedding [V, D] and, for an untied model, its head [V, D] (HF's layout)."""
    embed_norms = relative_norms(embed_VD)
    head_norms = None if head_VD is None else relative_norms(head_VD)
    flagged = lambda norms: tuple(int(i) for i in np.flatnonzero(norms <= ratio))  # noqa: E731
    return Untrained(flagged(embed_norms), () if head_norms is None else flagged(head_norms), embed_norms, head_norms)


def read_untrained(path_or_id: str | os.PathLike, allow_pickle: bool = False, ratio: float = RATIO) -> Untrained:
    """`find_untrained` on a Hugging Face Llama checkpoint, reading only its embedding and (untied) head."""
    model_dir = resolve_model_dir(path_or_id)
    config = LlamaConfig.from_hf(read_json(model_dir / "config.json", "model"))
    wanted = {EMBED} if config.tie_word_embeddings else {EMBED, HEAD}
    tensors = {name: array for name, _, array in iter_tensors(weight_files(model_dir, allow_pickle), wanted)}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise JaxtokError(f"checkpoint {model_dir} lacks {', '.join(missing)}")
    return find_untrained(tensors[EMBED], tensors.get(HEAD), ratio)


def describe(ids, tokenizer, limit: int = 20) -> str:
    """`12 '<|eot_id|>', 13 '<|x|>', ... and N more` (a row past the tokenizer's tokens shows as None)."""
    shown = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(int(i))!r}" for i in list(ids)[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return (shown + more) or "none"


def report(found: Untrained, trained, tokenizer) -> list[str]:
    """What tokens.train_untrained did, for the job's log: the rows found, those that train, those left."""
    left = [i for i in found.ids if i not in set(trained)]
    return [
        f"untrained rows in the base (norm <= {RATIO:g} x the median row norm): {len(found.ids)} tokens "
        f"(embedding {len(found.embed_ids)}, head {len(found.head_ids) if found.head_norms is not None else 'tied'})",
        f"untrained rows that train (the data use them): {describe(trained, tokenizer)}",
        f"untrained rows left as they are (the data never use them): {describe(left, tokenizer)}",
    ]
