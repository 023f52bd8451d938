"""``cdm``: Contextual Dynamic Mapping (Chen et al., Findings of ACL 2025, arXiv 2502.11104)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ctkd_bench.alignment.mined import dtw_align, token_edit_costs
from ctkd_bench.alignment.vocab import token_surfaces
from ctkd_bench.api import (
    IGNORE_INDEX,
    DistillBatch,
    Distiller,
    KDConfig,
    ModelOutputs,
    Needs,
    register_method,
    require,
)
from ctkd_bench.losses import zero_loss

UNMAPPED = -1  # the reference's 0 ("no partner"); here student id 0 is a valid partner
ENTROPY_EPS = 1e-10  # the reference's calculate_weight adds it to the probabilities


# ------------------------------------------------------------------------------ the three pieces


def entropy_factors(logits: torch.Tensor) -> np.ndarray:
    """The DTW weight of each position of one sequence: ``int(3 + 3·σ(4·minmax(H) − 2))``.

    Args:
        logits: float ``[N, V]``, one sequence's logits at its DTW positions.

    Returns:
        int64 ``[N]`` in {3, 4, 5}. ``H = −Σ (p + 1e-10)·log(p + 1e-10)``, min-max normalized over the N
        positions (0 where all N entropies are equal; the reference divides by zero there), and the
        float factor is truncated to an integer, as the reference's ``int32`` cast.
    """
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1) + ENTROPY_EPS
        entropy = -(probs * probs.log()).sum(-1)
        low, span = entropy.min(), entropy.max() - entropy.min()
        scaled = torch.where(span > 0, (entropy - low) / span.clamp_min(1e-30), torch.zeros_like(entropy))
        factor = torch.sigmoid(scaled * 4 - 2) * 3 + 3
        return factor.to(torch.int64).cpu().numpy()


def weighted_dtw(
    edit: np.ndarray, teacher_factor: np.ndarray, student_factor: np.ndarray
) -> list[tuple[int, int]]:
    """DTW path (teacher row, student column) under ``cost[i, j] = edit[i, j]·f_T[i]·f_S[j]``."""
    cost = edit.astype(np.float64) * teacher_factor[:, None] * student_factor[None, :]
    return dtw_align(cost)


def merge_weights(
    path: list[tuple[int, int]], n_teacher: int, n_student: int
) -> tuple[np.ndarray, np.ndarray]:
    """The averaging of both sides' logits onto the merged positions of a DTW path.

    The reference (``transform_step_logits_fast``) first averages the teacher logits of every teacher
    position a student position is aligned to (many-to-one), then averages both sides over each
    *distinct* list of student positions a teacher position is aligned to (one-to-many), in teacher
    order. Both are linear, so they are returned as matrices.

    Returns:
        ``w_teacher`` float64 ``[U, n_teacher]`` and ``w_student`` ``[U, n_student]``:
        merged teacher logits ``= w_teacher @ z_T``, merged student logits ``= w_student @ z_S``.
    """
    to_teacher: list[list[int]] = [[] for _ in range(n_student)]
    to_student: list[list[int]] = [[] for _ in range(n_teacher)]
    for i, j in path:
        to_student[i].append(j)
        to_teacher[j].append(i)
    onto_student = np.zeros((n_student, n_teacher))
    for j, partners in enumerate(to_teacher):
        onto_student[j, partners] = 1.0 / len(partners)
    groups: list[list[int]] = []
    for partners in to_student:
        if partners not in groups:
            groups.append(partners)
    w_student = np.zeros((len(groups), n_student))
    for g, partners in enumerate(groups):
        w_student[g, partners] = 1.0 / len(partners)
    return w_student @ onto_student, w_student


def normalized_edit_distances(a: list[str], b: list[str]) -> np.ndarray:
    """``d(x, y) / (|x| + |y|)`` for every pair, spaces removed; 0 where both are empty (reference dist_fn)."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    aa = [t.replace(" ", "") for t in a]
    bb = [t.replace(" ", "") for t in b]
    dist = process.cdist(aa, bb, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
    total = np.array([len(t) for t in aa])[:, None] + np.array([len(t) for t in bb])[None, :]
    return np.where(total > 0, dist / np.maximum(total, 1), 0.0)


def extend_vocab_map(
    t2s: np.ndarray,
    taken: np.ndarray,
    teacher_top: np.ndarray,
    student_top: np.ndarray,
    teacher_texts: list[str | None],
    student_texts: list[str | None],
    threshold: float,
    one_to_one: bool = False,
    teacher_has_text: np.ndarray | None = None,
) -> int:
    """The dynamic vocabulary map: give unmapped teacher top-K tokens a student top-K partner, in place.

    Rows of ``teacher_top`` / ``student_top`` (int ``[U, K]``, each in descending logit order) are the
    merged positions of one example, visited in order; within a row the teacher tokens are visited in
    rank order. A teacher token without a partner (``t2s == -1``, special tokens excepted) gets the
    student token of the same row's top K with the smallest normalized edit distance, if that is
    ``< threshold``; ties go to the higher-ranked student token. With ``one_to_one``, student tokens
    that already have a teacher partner (``taken``) are not candidates. A new pair holds for the rest
    of training (it is never revisited). ``teacher_has_text``: bool ``[V_T]``, precomputed
    ``teacher_texts[t] is not None``. Returns how many pairs were added.
    """
    if teacher_has_text is None:
        teacher_has_text = np.array([t is not None for t in teacher_texts], dtype=bool)
    missing = (t2s[teacher_top] == UNMAPPED) & teacher_has_text[teacher_top]
    added = 0
    for u in np.flatnonzero(missing.any(axis=1)):
        tokens = [int(t) for t in teacher_top[u][missing[u]]]
        cands = np.array([int(s) for s in student_top[u] if student_texts[s] is not None], dtype=np.int64)
        if cands.size == 0:
            continue
        dist = normalized_edit_distances(
            [teacher_texts[t] for t in tokens], [student_texts[s] for s in cands]
        )
        for row, t in enumerate(tokens):
            if t2s[t] != UNMAPPED:  # paired at an earlier row of this example
                continue
            ok = dist[row] < threshold
            if one_to_one:
                ok &= ~taken[cands]
            if not ok.any():
                continue
            s = int(cands[int(np.argmin(np.where(ok, dist[row], np.inf)))])
            t2s[t] = s
            taken[s] = True
            added += 1
    return added


def cdm_divergence(student_merged: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per merged position ``Σ_s p(s)·(τ²·log p(s) − log softmax(z_S/τ)(s))`` (reference ``dist_func``).

    ``target`` float ``[U, V_S]``: the teacher distribution carried into the student vocabulary.
    """
    s_logp = torch.log_softmax(student_merged.float() / temperature, dim=-1)
    return (torch.xlogy(target, target) * temperature**2 - target * s_logp).sum(-1)


# ------------------------------------------------------------------------------------- method


@register_method("cdm")
class CDM(Distiller):
    """Contextual Dynamic Mapping: entropy-weighted DTW, merged logits, a dynamic top-K vocabulary map.

    Chen, Liu, Meng, Chen, Xu, Zhou, "Enhancing Cross-Tokenizer Knowledge Distillation with Contextual
    Dynamical Mapping", Findings of ACL 2025, arXiv 2502.11104. Reference:
    ``pppa2019/ContexualDynamicMapping:modeling/run_clm_distill_CDM.py`` (``calculate_weight``,
    ``DistillationTrainer.compute_edit_distance_kd_loss`` / ``transform_step_logits_fast`` /
    ``get_dymaic_mapper`` / ``dist_func`` / ``dtw``; defaults in ``ModelArguments``), read as the file
    that is indexed publicly; a DSKD-framework port (``CDMKLD``, repository unidentified) was read for
    the points noted below.

    Per example, over each side's logits positions that predict a response target (``logits[:, t]``
    with ``labels[:, t + 1] != IGNORE_INDEX``; DTW reads the *input* token at t, as :mod:`ctkd_bench.alignment.
    mined`):

    1. **Entropy-weighted DTW.** ``f = int(3 + 3·σ(4·minmax(H) − 2))`` ∈ {3, 4, 5} per position from
       each model's own logits (``H`` the entropy of ``softmax(z) + 1e-10``, min-max over the
       example's positions; :func:`entropy_factors`). DTW (rows teacher, columns student; backtrack
       diagonal > up > left) with ``cost[i, j] = ed(x_T,i, x_S,j)·f_T,i·f_S,j``, ``ed`` the Levenshtein
       distance of the token strings with spaces removed (reference ``cost_fn``).
    2. **Merging.** Teacher logits are averaged over the teacher positions of each student position
       (many-to-one); then both sides' logits are averaged over each distinct student group of a
       teacher position (one-to-many): ``Z_T = W_T·z_T``, ``Z_S = W_S·z_S`` (:func:`merge_weights`),
       U merged positions per example.
    3. **Dynamic vocabulary map** (teacher id -> student id, :func:`extend_vocab_map`). It starts as
       the exact-match map (identical token bytes, ``Ġ``/``▁`` normalized; EOS -> EOS; the reference
       loads such an ``teacher_to_student_id_mapping`` file, which the port calls the "Exact Matching
       Mode" map). At every merged position, each of the teacher's top K = 100 tokens (of ``Z_T``)
       without a partner gets the student top-K token (of ``Z_S``) with the smallest normalized edit
       distance ``ed/(|a|+|b|) < 0.3`` (``simi_threadshold``). The map is updated in place and kept
       for the rest of training (the reference passes its map by reference).
    4. **Loss.** The target re-indexes the teacher distribution into the student vocabulary through
       the map: ``p(s) ∝ Σ_{t: m(t)=s} softmax(Z_T)(t)`` (the reference gives unmapped entries a logit
       of -1e4, i.e. zero mass, and renormalizes), un-tempered. ``KD_u = Σ_s p(s)·(τ²·log p(s) −
       log softmax(Z_S/τ)(s))`` with τ = 0.8: the reference's ``dist_func``, whose τ² on the teacher
       log-probabilities makes the value ``τ²·(−H(p)) + CE(p, q)`` rather than a KL (the gradient is
       that of the KL). ``KD`` = mean over all merged positions of the batch.
       ``loss = 0.9·CE + 0.1·KD`` (``kd_alpha = 0.9`` weights the CE: ``kd_rate = 1 − kd_alpha``).

    Defaults, all from the reference's ``ModelArguments``: ``kd_alpha = 0.9`` (here ``kd_rate = 0.1``),
    ``kd_temperature = 0.8``, ``topk = 100``, ``simi_threadshold = 0.3``; the factor formula and the
    1e-10 from ``calculate_weight``; the -1e4 masking from ``transform_step_logits_fast``.

    Deviations:

    * Batching: the reference runs one example per step (its ``torch.stack`` of per-example merged
      logits needs equal lengths; DWA-KD reports batch size 1 at about 1 s/step). Here every example of
      the batch is processed in turn inside one forward and KD is the mean over the batch's merged
      positions. The reference divides the summed divergence by the number of (position, vocabulary)
      entries, i.e. also by the teacher vocabulary size (~1e-5 of a per-token value, which makes the
      0.1-weighted KD negligible); here it is a per-token mean (sum over the vocabulary, as the port).
    * The reference's stored ``transform_step_logits_fast`` returns two *teacher* tensors (the
      merged teacher logits and their re-indexing), so its KD carries no student gradient; the port
      gathers both sides in a top-K subspace instead. Here the re-indexed teacher distribution is the
      target of the merged student logits over the full student vocabulary, as the paper describes.
    * Positions: the reference takes the logits at the *label* positions of unshifted HF labels (the
      first response token's predictor is left out, the EOS position's logits predict past the end);
      here the positions are those predicting the response tokens and EOS (as every method here).
    * Candidate exclusion: the reference removes from the student candidates the ids whose *number*
      equals an unmapped *teacher* id (ids of two vocabularies mixed up, so a pseudo-random subset).
      Here nothing is excluded by default (the paper's description); ``one_to_one = True`` excludes
      student tokens that already have a partner (one reading of the intent; it keeps the map
      injective). On gemma3-270m -> smollm2-135m (46,254 of 262,144 teacher ids exact-matched) the
      first batch of 4 x 256 adds 283 pairs by default and only 8 with ``one_to_one``, since the exact
      map already takes 46k of the student's 49k tokens. Several teacher ids mapped to one student id
      add their probabilities. Among equal distances the higher-ranked student candidate wins (the
      reference iterates over a Python ``set``). Special tokens (no surface) never enter the dynamic
      map.
    * Strings are decoded token bytes with ``Ġ``/``▁`` normalized for every tokenizer (reference: a
      per-class marker table, then ``convert_tokens_to_string``); the reference's special-token
      equivalence (``</s>`` ~ ``<|im_end|>``) is moot, since DTW never reads an EOS input here.
    * Equal entropies over a whole example give factor 3 everywhere (the reference divides 0 by 0);
      a constant factor does not change the path.

    Cost: everything depends on the models' logits (the entropy factors fix the DTW path, which fixes
    the merge, which fixes the top-K), so nothing but the token ids can be precomputed; the data
    pipeline computes no artifact for CDM. Per example the forward computes the teacher's head at its
    response positions only (``[n_T, V_T]``, from the last hidden states; the runner skips the full
    teacher logits), the entropies on the device, then on the CPU the edit-distance matrix (rapidfuzz,
    C++), the DTW (:func:`ctkd_bench.alignment.mined.dtw_align`, a row-vectorized numpy scan), the
    merge matrices and the map update (one rapidfuzz call per merged position that has an unmapped
    teacher top-K token); the merges are two matmuls on the device. Measured on a shared 2-core CPU
    (load ~8) with the real pair, 4 examples of 256 student / ~250 teacher tokens, K = 100: the
    CPU-only part (edit costs, DTW, merge matrices, map update) takes about 0.3 s on the first batch
    and 0.15 s once the map has settled; the tensor part (teacher head over 262k ids at the response
    positions, entropies, target, divergence) about 10 s on that CPU (not measured on a GPU). End to
    end (``ctkd-bench run --methods cdm --pair gemma3-270m:smollm2-135m --batch-size 4 --max-length
    256 --steps 3``, same CPU, run with ``one_to_one = True``): 75.5 s/step, of which the teacher
    forward 10.8 s (indicative only).

    State: the map is the persistent buffer ``teacher_to_student`` (long ``[V_T]``, -1 unmapped), so
    it is in the method's ``state_dict``: a run's checkpoint (``trainee`` state) saves it and a resume
    restores it, so a resumed run continues with the same map. It is not part of the saved student.
    Under data parallelism each process extends its own copy and DDP's buffer broadcast replaces it by
    rank 0's at every forward, so all processes use rank 0's map.
    """

    paper_name = "CDM"
    summary = "KL to merged teacher logits: entropy-weighted DTW + dynamic top-K vocabulary map"
    ablations = {
        "full": {},
        "exact-map": {"dynamic_map": False},
        "plain-dtw": {"entropy_weighting": False},
    }

    @dataclass
    class Config(KDConfig):
        kd_rate: float = 0.1  # 1 - kd_alpha (reference kd_alpha = 0.9 weights the CE)
        temperature: float = 0.8  # kd_temperature: divides the student logits only
        topk: int = 100  # teacher / student candidates per merged position
        similarity_threshold: float = 0.3  # simi_threadshold: normalized edit distance must be below
        dynamic_map: bool = True  # False: the exact-match map only (ablation)
        entropy_weighting: bool = True  # False: DTW on the plain edit distance (ablation)
        one_to_one: bool = False  # True: only student tokens without a teacher partner are candidates

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self, "topk", isinstance(self.topk, int) and self.topk >= 1, "an integer >= 1")
            require(self, "similarity_threshold", 0 <= self.similarity_threshold <= 1, "in [0, 1]")

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        s_tok, t_tok = context.student_tokenizer, context.teacher_tokenizer
        if s_tok is None or t_tok is None:
            raise ValueError("cdm needs both tokenizers")
        s_surfaces, t_surfaces = token_surfaces(s_tok), token_surfaces(t_tok)
        self.student_texts = [None if b is None else b.decode("utf-8", errors="replace") for b in s_surfaces]
        self.teacher_texts = [None if b is None else b.decode("utf-8", errors="replace") for b in t_surfaces]
        # DTW reads special tokens (none in a response, in practice) as empty strings
        self._s_dtw = [t or "" for t in self.student_texts]
        self._t_dtw = [t or "" for t in self.teacher_texts]
        self._t_has_text = np.array([t is not None for t in self.teacher_texts], dtype=bool)
        first: dict[bytes, int] = {}
        for s_id, surface in enumerate(s_surfaces):
            if surface is not None:
                first.setdefault(surface, s_id)
        t2s = np.full(len(t_surfaces), UNMAPPED, dtype=np.int64)
        for t_id, surface in enumerate(t_surfaces):
            if surface is not None and surface in first:
                t2s[t_id] = first[surface]
        if t_tok.eos_token_id is not None and s_tok.eos_token_id is not None:
            t2s[t_tok.eos_token_id] = s_tok.eos_token_id
        self.register_buffer("teacher_to_student", torch.from_numpy(t2s))
        self.student_vocab = len(s_surfaces)
        self.map_added = 0  # pairs added by the dynamic map in this process (diagnostics)

    @classmethod
    def needs(cls, config) -> Needs:
        return Needs(teacher_hidden_states=True, teacher_layers={-1}, tokenizers="cross")

    def forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs | None
    ) -> dict[str, torch.Tensor]:
        # float32 throughout (the merges are matmuls, which bf16 autocast would round); the teacher
        # head still runs in the teacher's dtype (bf16 on CUDA; the reference's teacher is fp16)
        with torch.autocast(device_type=student.logits.device.type, enabled=False):
            return self._forward(batch, student, teacher)

    def _forward(
        self, batch: DistillBatch, student: ModelOutputs, teacher: ModelOutputs
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        t2s = self.teacher_to_student.cpu().numpy().copy()
        taken = np.zeros(self.student_vocab, dtype=bool)
        taken[t2s[t2s >= 0]] = True
        t_hidden = teacher.hidden_states[-1]
        s_valid = batch.student.labels[:, 1:] != IGNORE_INDEX
        t_valid = batch.teacher.labels[:, 1:] != IGNORE_INDEX
        s_ids_all, t_ids_all = batch.student.input_ids.cpu().numpy(), batch.teacher.input_ids.cpu().numpy()
        terms = []
        for b in range(len(batch.student.labels)):
            s_pos = s_valid[b].nonzero().squeeze(-1)
            t_pos = t_valid[b].nonzero().squeeze(-1)
            if s_pos.numel() == 0 or t_pos.numel() == 0:
                continue
            s_logits = student.logits[b, s_pos].float()  # [n_S, V_S], with gradient
            with torch.no_grad():
                t_logits = teacher.head(t_hidden[b, t_pos]).float()  # [n_T, V_T]
            s_tok = s_ids_all[b, s_pos.cpu().numpy()]
            t_tok = t_ids_all[b, t_pos.cpu().numpy()]
            edit = token_edit_costs([self._t_dtw[i] for i in t_tok], [self._s_dtw[i] for i in s_tok])
            if cfg.entropy_weighting:
                t_factor, s_factor = entropy_factors(t_logits), entropy_factors(s_logits.detach())
            else:
                t_factor, s_factor = np.ones(len(t_tok), np.int64), np.ones(len(s_tok), np.int64)
            path = weighted_dtw(edit, t_factor, s_factor)
            w_t, w_s = merge_weights(path, len(t_tok), len(s_tok))
            with torch.no_grad():
                t_merged = torch.from_numpy(w_t).to(t_logits) @ t_logits  # [U, V_T]
            s_merged = torch.from_numpy(w_s).to(s_logits) @ s_logits  # [U, V_S]
            if cfg.dynamic_map and cfg.similarity_threshold > 0:
                k_t, k_s = min(cfg.topk, t_merged.shape[-1]), min(cfg.topk, s_merged.shape[-1])
                t_top = t_merged.topk(k_t, dim=-1).indices.cpu().numpy()
                s_top = s_merged.detach().topk(k_s, dim=-1).indices.cpu().numpy()
                added = extend_vocab_map(
                    t2s,
                    taken,
                    t_top,
                    s_top,
                    self.teacher_texts,
                    self.student_texts,
                    cfg.similarity_threshold,
                    cfg.one_to_one,
                    self._t_has_text,
                )
                if added:
                    self.teacher_to_student.copy_(torch.from_numpy(t2s))
                    self.map_added += added
            target = self._target(t_merged)
            terms.append(cdm_divergence(s_merged, target, cfg.temperature))
        if not terms:
            return {"kd": zero_loss(student.logits)}
        return {"kd": torch.cat(terms).mean()}

    def _target(self, t_merged: torch.Tensor) -> torch.Tensor:
        """The teacher distribution carried into the student vocabulary through the current map."""
        with torch.no_grad():
            t2s = self.teacher_to_student
            mapped = (t2s >= 0).nonzero().squeeze(-1)
            z = t_merged.index_select(-1, mapped)
            p = (z - z.max(-1, keepdim=True).values).exp()
            target = t_merged.new_zeros(t_merged.shape[0], self.student_vocab)
            target.index_add_(1, t2s[mapped], p)
            return target / target.sum(-1, keepdim=True)
