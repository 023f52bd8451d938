"""MinED alignment: DTW over token strings and the minimum-edit-distance vocabulary map.

FuseLLM (Wan et al. 2024, arXiv 2401.10491; ``fanqiwan/FuseAI:FuseLLM/src/utils/{token_alignment,
vocab_mapping}.py``) as made fast by DSKD (``songmzhang/DSKD:code/criterions/min_edit_dis_kld.py``):

* **vocabulary map** teacher -> student: each teacher token maps to the student token with the same
  string, else to the student token at minimum edit distance. Strings are the decoded surfaces of
  :func:`ctkd_bench.alignment.vocab.token_surfaces` (``Ġ``/``▁`` normalized to a space, byte tokens to
  their bytes). Ties go to the lowest student id. Built once per tokenizer pair (rapidfuzz, batched
  C++), cached on disk; about a minute for a 262k x 49k pair.
* **sequence alignment**: dynamic time warping between the two token sequences with the edit distance
  of the token strings (word-boundary spaces removed, as DSKD's ``dist_fn``) as the cost; the
  backtrack follows DSKD's ``dtw`` (diagonal, then up, then left on ties). A student position is
  *aligned* when DTW maps it to exactly one teacher position and the vocabulary map sends that
  teacher token to the same student token (DSKD's "ensure they are really similar" check).

Both run in the data pipeline; a training step only indexes the resulting tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctkd_bench.alignment.registry import TokenizerPair, pad_rows, register_alignment
from ctkd_bench.alignment.vocab import token_surfaces, tokenizer_fingerprint
from ctkd_bench.files import torch_save_atomic


@dataclass(frozen=True)
class VocabMap:
    """The MinED vocabulary map of a (student, teacher) pair.

    ``teacher_to_student`` long ``[V_T]``: the student id each teacher id maps to (-1: a special token,
    unmapped). ``student_ids`` / ``teacher_ids`` long ``[V']``: for every student id that some teacher
    id maps to, the first (lowest) such teacher id (DSKD keeps ``max_align_num = 1``). EOS maps to EOS.
    """

    teacher_to_student: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor


def _texts(tokenizer) -> list[str | None]:
    return [s.decode("utf-8", errors="replace") if s is not None else None for s in token_surfaces(tokenizer)]


def min_edit_vocab_map(
    teacher_texts: list[str | None],
    student_texts: list[str | None],
    chunk: int = 2048,
    progress: bool = False,
) -> np.ndarray:
    """For each teacher string, the student index with the same string, else the one at minimum edit distance.

    ``None`` entries (special tokens) map to -1 and are never chosen. Returns int64 ``[len(teacher_texts)]``.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    student_index = [i for i, t in enumerate(student_texts) if t is not None]
    choices = [student_texts[i] for i in student_index]
    exact: dict[str, int] = {}
    for i in student_index:
        exact.setdefault(student_texts[i], i)
    result = np.full(len(teacher_texts), -1, dtype=np.int64)
    pending: list[int] = []
    for t_id, text in enumerate(teacher_texts):
        if text is None:
            continue
        if text in exact:
            result[t_id] = exact[text]
        else:
            pending.append(t_id)
    from tqdm.auto import tqdm

    lookup = np.asarray(student_index, dtype=np.int64)
    for start in tqdm(range(0, len(pending), chunk), desc="MinED vocabulary map", disable=not progress):
        ids = pending[start : start + chunk]
        dist = process.cdist(
            [teacher_texts[i] for i in ids], choices, scorer=Levenshtein.distance, dtype=np.int32, workers=-1
        )
        result[ids] = lookup[dist.argmin(axis=1)]  # argmin: the first (lowest id) among ties
    return result


def build_vocab_map(student_tokenizer, teacher_tokenizer, progress: bool = False) -> VocabMap:
    t2s = min_edit_vocab_map(_texts(teacher_tokenizer), _texts(student_tokenizer), progress=progress)
    t2s[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    first: dict[int, int] = {}
    for t_id in np.flatnonzero(t2s >= 0):
        first.setdefault(int(t2s[t_id]), int(t_id))
    s_ids = sorted(first)
    return VocabMap(
        teacher_to_student=torch.from_numpy(t2s),
        student_ids=torch.tensor(s_ids, dtype=torch.long),
        teacher_ids=torch.tensor([first[s] for s in s_ids], dtype=torch.long),
    )


def mined_vocab_map(
    student_tokenizer, teacher_tokenizer, cache_dir: Path, progress: bool = False
) -> VocabMap:
    """The MinED vocabulary map, from the disk cache under ``cache_dir`` when this tokenizer pair was seen before."""
    key = hashlib.sha256(
        f"{tokenizer_fingerprint(student_tokenizer)}-{tokenizer_fingerprint(teacher_tokenizer)}".encode()
    ).hexdigest()
    path = Path(cache_dir) / "mined" / f"{key[:24]}.pt"
    if path.is_file():
        blob = torch.load(path)
        return VocabMap(blob["teacher_to_student"], blob["student_ids"], blob["teacher_ids"])
    result = build_vocab_map(student_tokenizer, teacher_tokenizer, progress=progress)
    torch_save_atomic(
        path,
        {
            "teacher_to_student": result.teacher_to_student,
            "student_ids": result.student_ids,
            "teacher_ids": result.teacher_ids,
        },
    )
    return result


def dtw_align(cost: np.ndarray) -> list[tuple[int, int]]:
    """Dynamic time warping on a cost matrix ``[n_a, n_b]``: the warping path, from ``(0, 0)`` on.

    The accumulated cost ``D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1])`` is filled
    one row at a time: the left dependency ``D[i, j] = min(a_j, cost[i, j] + D[i, j-1])`` (``a_j`` the
    best of the diagonal and upper cells) is a min-plus scan, solved with a cumulative sum and a running
    minimum. The backtrack starts at the last cell and prefers the diagonal, then up, then left (DSKD).
    """
    n_a, n_b = cost.shape
    if n_a == 0 or n_b == 0:
        return []
    acc = np.empty((n_a, n_b), dtype=np.float64)
    c = cost.astype(np.float64)
    csum = np.cumsum(c[0])
    acc[0] = csum  # first row: only left moves from (0, 0)
    for i in range(1, n_a):
        prev = acc[i - 1]
        best = np.empty(n_b)
        best[0] = prev[0]
        best[1:] = np.minimum(prev[1:], prev[:-1])
        a = c[i] + best
        cs = np.cumsum(c[i])
        acc[i] = cs + np.minimum.accumulate(a - cs)
    path: list[tuple[int, int]] = []
    i, j = n_a - 1, n_b - 1
    while True:
        path.append((i, j))
        if i == 0 and j == 0:
            break
        diag = acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = acc[i - 1, j] if i > 0 else np.inf
        left = acc[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    path.reverse()
    return path


def token_edit_costs(a_texts: list[str], b_texts: list[str]) -> np.ndarray:
    """Edit distance between every pair of token strings, word-boundary spaces removed (DSKD's dist_fn)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    a = [t.replace(" ", "") for t in a_texts]
    b = [t.replace(" ", "") for t in b_texts]
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.int32)
    return process.cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32)


class MinedAligner:
    """Per-example MinED alignment of prediction positions, for one tokenizer pair (holds its ``vocab_map``)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, vocab_map: VocabMap) -> None:
        self.vocab_map = vocab_map
        self.student_texts = [t or "" for t in _texts(student_tokenizer)]
        self.teacher_texts = [t or "" for t in _texts(teacher_tokenizer)]
        self.t2s = vocab_map.teacher_to_student.numpy()

    def align(
        self,
        student_ids: np.ndarray,
        student_pos: np.ndarray,
        teacher_ids: np.ndarray,
        teacher_pos: np.ndarray,
    ) -> np.ndarray:
        """Aligned (student position, teacher position) pairs, int64 ``[M, 2]``.

        ``*_pos``: the positions whose logits predict a labelled token, in order; DTW runs over the
        *input* tokens at those positions (as DSKD does), so an aligned pair reads the same token and
        predicts what follows it.
        """
        s_tok, t_tok = student_ids[student_pos], teacher_ids[teacher_pos]
        # DSKD runs dtw(teacher tokens, student tokens): rows are the teacher, which fixes the tie-breaking
        cost = token_edit_costs(
            [self.teacher_texts[i] for i in t_tok], [self.student_texts[i] for i in s_tok]
        )
        partners: list[list[int]] = [[] for _ in range(len(s_tok))]
        for t_i, s_i in dtw_align(cost):
            partners[s_i].append(t_i)
        pairs = [
            (student_pos[s_i], teacher_pos[ts[0]])
            for s_i, ts in enumerate(partners)
            if len(ts) == 1 and self.t2s[t_tok[ts[0]]] == s_tok[s_i]
        ]
        return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# ---------------------------------------------------------------------------------- the artifact


@dataclass(frozen=True)
class MinedPairs:
    """A batch's MinED alignment: ``pairs`` long ``[B, M, 2]`` rows ``(student pos, teacher pos)`` of
    logits positions aligned by DTW (padded rows are zeros), ``mask`` bool ``[B, M]``."""

    pairs: torch.Tensor
    mask: torch.Tensor


def predicting_positions(side) -> np.ndarray:
    """The logits positions of one side's encoding that predict a label (response tokens and EOS).

    ``side``: a :class:`~ctkd_bench.data.encode.SideEncoding` (``response_start``, ``response_end``,
    ``has_eos``); position 0 predicts nothing before it, so a response starting at 0 loses its first.
    """
    pos = np.arange(side.response_start - 1, side.response_end + int(side.has_eos) - 1)
    return pos[pos >= 0]


def _mined_per_pair(tokenizers: TokenizerPair) -> MinedAligner:
    vocab_map = mined_vocab_map(
        tokenizers.student, tokenizers.teacher, tokenizers.cache_dir, progress=tokenizers.progress
    )
    return MinedAligner(tokenizers.student, tokenizers.teacher, vocab_map)


def _mined_per_example(aligner: MinedAligner, example) -> np.ndarray:
    student, teacher = example.student, example.teacher
    return aligner.align(
        student.input_ids, predicting_positions(student), teacher.input_ids, predicting_positions(teacher)
    )


def _mined_per_batch(values: list[np.ndarray], batch) -> MinedPairs:
    return MinedPairs(*pad_rows(values, 2))


register_alignment(
    "mined",
    summary="MinED: min-edit-distance vocabulary map (per pair, MethodContext.vocab_map) and the DTW "
    "alignment of each example's prediction positions (batch.artifact('mined'): MinedPairs)",
    per_pair=_mined_per_pair,
    per_example=_mined_per_example,
    per_batch=_mined_per_batch,
)
