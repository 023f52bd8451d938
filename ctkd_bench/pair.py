"""The pair: what every run of one (teacher, student) pair shares, prepared once for the pair.

Second step of a run (:mod:`ctkd_bench.runner`: plan -> pair -> lockstep group -> recipe step loop ->
record). Once the runner has planned a pair's runs, :func:`_prepare_pair` builds what those to train
need: the alignment artifacts the methods name, the training stream (:func:`training_stream`: a seeded
shuffle of the training split, dual-tokenized and aligned once per example, shared by every method) and
the teacher (:func:`_prepare_teacher`), loaded once, only if some method needs it, or read from the
teacher-output cache alone when it holds every example. :class:`PairContext` holds all of it;
:func:`pair_teacher` gives a batch's teacher outputs (cache or live forward) to a student's step
(:mod:`ctkd_bench.recipe`) and to a lockstep group's one forward (:mod:`ctkd_bench.lockstep`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ctkd_bench import zoo
from ctkd_bench.alignment import SharedVocab, TokenizerPair, VocabMap, build_pair_artifacts
from ctkd_bench.api import ModelOutputs, Needs
from ctkd_bench.data.batch import DistillBatch
from ctkd_bench.data.encode import EncodedExample, PairEncoder
from ctkd_bench.errors import UserError
from ctkd_bench.models import teacher_forward
from ctkd_bench.teacher_cache import Features, TeacherCache, example_key, store_identity

if TYPE_CHECKING:  # annotations only: the runner imports this module
    from ctkd_bench.runner import PlannedRun

# ---------------------------------------------- pair: tokenizers, alignment, the training stream, the teacher


@dataclass
class PairContext:
    """What every run of one pair shares: tokenizers, alignment artifacts, the training stream, the teacher."""

    specs: tuple[zoo.ModelSpec | None, zoo.ModelSpec]
    tokenizers: tuple[Any, Any]  # (student, teacher or None)
    same: bool
    examples_available: int = 0
    stream: list[EncodedExample] = field(default_factory=list)
    encoder: PairEncoder | None = None
    vocab: SharedVocab | None = None
    vocab_map: VocabMap | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # per-pair values, name -> value
    teacher: Any = None  # the loaded teacher; None also when every batch comes from the cache
    cache: TeacherCache | None = None  # the teacher-output cache (request.teacher_cache)
    teacher_config: Any = None  # for MethodContext: the teacher's config, its layer count, its scale
    teacher_layers: int = 0
    teacher_embedding_scale: float = 1.0
    teacher_dtype: str | None = None

    @property
    def names(self) -> str:
        teacher, student = self.specs
        return f"{teacher.short if teacher else 'none'}:{student.short}"


def _prepare_pair(request, accelerator, pc: PairContext, planned: list[PlannedRun], examples, log) -> None:
    """Alignment artifacts, the training stream and the teacher, as far as the runs to train need them."""
    training = [p for p in planned if p.trained is None]
    if not training:
        return
    train = request.train
    student_tok, teacher_tok = pc.tokenizers
    # every alignment artifact the runs name, built once for the pair (a slow one keeps its disk cache in
    # zoo's folder); the encoder and collate build their per-example and per-batch values
    names = set().union(*(p.needs.alignment for p in training)) if teacher_tok is not None else set()
    pair = TokenizerPair(student_tok, teacher_tok, zoo.cache_dir(), progress=request.progress)
    artifacts = build_pair_artifacts(names, pair)
    # the two per-pair values that MethodContext hands to methods as fields
    pc.vocab = artifacts.get("shared_vocab")
    pc.vocab_map = getattr(artifacts.get("mined"), "vocab_map", None)
    pc.artifacts = artifacts
    pc.examples_available = len(examples)
    pc.encoder = PairEncoder(
        student_tok,
        teacher_tok if teacher_tok is not None else student_tok,
        max_prompt_tokens=train.max_prompt_tokens,
        max_length=train.max_length,
        artifacts=artifacts,
    )
    count = train.steps * train.grad_accum * train.batch_size * accelerator.num_processes
    pc.stream = training_stream(
        examples, pc.encoder, count, train.seed, progress=request.progress and accelerator.is_main_process
    )
    if any(p.needs.teacher for p in training):
        _prepare_teacher(request, accelerator, pc, training, log)


def _prepare_teacher(request, accelerator, pc: PairContext, training: list[PlannedRun], log) -> None:
    """The teacher, loaded; or, with ``teacher_cache``, read from the cache alone when it holds every
    training example's features (the teacher is then not loaded at all)."""
    train, spec = request.train, pc.specs[0]
    # a frozen teacher needs no fp32 master weights: bf16 on GPUs halves its memory
    pc.teacher_dtype = "bfloat16" if accelerator.mixed_precision == "bf16" else "float32"
    eager = any(p.needs.teacher_attentions for p in training)
    if request.teacher_cache:
        identity = store_identity(
            zoo.model_identity(spec),
            seed=train.seed if zoo.seeded_weights(spec) else None,
            dtype=pc.teacher_dtype,
            device=accelerator.device.type,
        )
        pc.cache = TeacherCache(request.teacher_cache, identity, read=request.teacher_cache_read)
        if pc.cache.has_teacher and pc.cache.reading:
            info = pc.cache.teacher()
            pc.teacher_config, pc.teacher_embedding_scale = info.config, info.embedding_scale
            pc.teacher_layers = pc.cache.layer_count()
            features = _features(pc, [p.needs for p in training])
            keys = {
                example_key(torch.as_tensor(e.teacher.input_ids), torch.ones(len(e.teacher.input_ids)))
                for e in pc.stream
            }
            stored = sum(pc.cache.covers([key], features) for key in keys)
            if stored == len(keys):
                log(
                    f"teacher: all {len(keys)} examples' features ({', '.join(features.names())}) read from "
                    f"the teacher-output cache {pc.cache.dir}; the teacher is not loaded"
                )
                return
            log(
                f"teacher-output cache {pc.cache.dir}: {stored} of {len(keys)} examples stored; the teacher "
                "computes and stores the others"
            )
    teacher = zoo.load_model(spec, seed=train.seed, dtype=pc.teacher_dtype)
    if eager:
        teacher.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    teacher.eval()
    pc.teacher = teacher.to(accelerator.device)
    pc.teacher_config, pc.teacher_layers = teacher.config, int(teacher.config.num_hidden_layers)
    pc.teacher_embedding_scale = zoo.embedding_scale(teacher)
    if pc.cache is not None:
        pc.cache.save_teacher(teacher, zoo.vocab_size(pc.tokenizers[1]), pc.teacher_embedding_scale)


def _features(pc: PairContext, needs: list[Needs]) -> Features:
    """The teacher features that ``needs`` read, resolved against the teacher's layers."""
    features = Features()
    for one in needs:
        features = features.union(Features.of(one, pc.teacher_layers))
    return features


def pair_teacher(pc: PairContext, batch: DistillBatch, needs: Needs, vocab: int) -> tuple[ModelOutputs, str]:
    """The teacher's outputs of what ``needs`` asks for, and where they came from: ``"cache"`` (every
    example of the batch stored) or ``"live"`` (a forward, whose features are then stored when the cache
    is on)."""
    features = Features.of(needs, pc.teacher_layers)
    if pc.cache is not None:
        cached = pc.cache.read(batch, features, pc.teacher_layers)
        if cached is not None:
            return cached, "cache"
    if pc.teacher is None:
        raise RuntimeError("the teacher-output cache lacks a batch's features and the teacher is not loaded")
    if pc.cache is not None and features.hidden:  # the stored features include the last layer for logits
        needs = replace(needs, teacher_hidden_states=True, teacher_layers=None)
    outputs = teacher_forward(pc.teacher, batch, needs, vocab)
    if pc.cache is not None:
        pc.cache.write(batch, outputs, features)
    return outputs, "live"


def training_stream(
    examples: list, encoder: PairEncoder, count: int, seed: int, progress: bool = False
) -> list[EncodedExample]:
    """``count`` encoded examples in a seeded shuffled order, epoch after epoch; skips are counted."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    cache: dict[int, EncodedExample | None] = {}
    stream: list[EncodedExample] = []
    bar = tqdm(total=count, desc="tokenizing + aligning", unit="ex", disable=not progress, leave=False)
    while len(stream) < count:
        order = list(range(len(examples)))
        rng.shuffle(order)
        before = len(stream)
        for index in order:
            if index not in cache:  # each example is tokenized and aligned once
                cache[index] = encoder.encode(examples[index])
            if cache[index] is not None:
                stream.append(cache[index])
                bar.update(1)
                if len(stream) == count:
                    break
        if len(stream) == before:
            bar.close()
            reasons = dict(encoder.stats.skipped)
            knobs = [
                flag
                for flag, word in (("--max-prompt-length", "prompt longer"), ("--max-length", "no room"))
                if any(word in reason for reason in reasons)
            ]
            raise UserError(
                f"no usable training example: all {len(examples)} were skipped ({reasons}); "
                f"raise {' or '.join(knobs) or '--max-length'} or use other data"
            )
    bar.close()
    return stream
