"""Greedy decoding with a KV cache that drops each row from the batch as soon as it ends.

``transformers`` ``generate`` keeps every row of a batch in the forward pass until the longest one ends
(a finished row is fed padding), and lm-eval's stop-string criterion ends a batch only once *every* row
has produced the stop string. With answers of very different lengths, about half of the work is
padding. :func:`greedy_decode` runs the same greedy decode (same prefill, position ids, 2D attention
mask, cache type, float32 logits, logits processors and ``argmax``) but ends a row at its EOS, its stop
string or the token budget and removes it from the batch and from the KV cache
(``Cache.batch_select_indices``); the other rows go on unchanged.

Equivalence with ``generate`` (what ``tests/test_generation.py`` checks token for token):

* a row ended by EOS or by the token budget: the same tokens, then the pad id, as ``generate`` writes;
* a row ended by a stop string (lm-eval's ``MultiTokenEOSCriteria`` test: the string occurs in the
  decoded last ``len(tokens(stop)) + 2`` new tokens): the same tokens up to there, then pads, where
  ``generate`` goes on decoding that row until the whole batch stops. lm-eval cuts the text at the
  first stop string, which lies within the common prefix, so the final text is the same.

``prune=False`` gives the plain decode loop (finished rows stay in the batch, fed pads, until all end),
the reference of ``python -m ctkd_bench.genbench``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# generation-config fields that add a logits processor (or change the search) which greedy_decode lacks
_UNSUPPORTED_WHEN_SET = (
    "guidance_scale",
    "sequence_bias",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "watermarking_config",
    "min_new_tokens",
    "prefix_allowed_tokens_fn",
    "assistant_model",
    "prompt_lookup_num_tokens",
    "custom_generate",
)
# generation kwargs greedy_decode understands (the rest make fast_greedy_supported say no)
_KNOWN_KWARGS = {
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "no_repeat_ngram_size",
    "repetition_penalty",
    "eos_token_id",
    "attention_mask",
}


@dataclass
class Generated:
    """What :func:`greedy_decode` returns."""

    sequences: torch.Tensor  # [batch, prompt + steps]: prompt, new tokens, pad id after a row's end
    kept: list[int]  # per row: new tokens up to and including the one that ended it (EOS, stop, budget)
    steps: int  # decode steps (the longest row's new tokens)
    forwards: int  # model calls
    row_steps: int  # rows x steps actually computed (padding rows included when prune=False)


class StopStrings:
    """lm-eval's per-row stop-string test (``MultiTokenEOSCriteria``), for any subset of rows."""

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [(s, len(tokenizer.encode(s, add_special_tokens=False)) + 2) for s in stops if s]

    def __bool__(self) -> bool:
        return bool(self.stops)

    def hit(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Rows (of ``new_tokens`` [rows, t], the generated tokens only) whose tail holds a stop string."""
        hits = torch.zeros(new_tokens.shape[0], dtype=torch.bool)
        for stop, lookback in self.stops:
            texts = self.tokenizer.batch_decode(new_tokens[:, -lookback:].tolist())
            hits |= torch.tensor([stop in text for text in texts], dtype=torch.bool)
        return hits.to(new_tokens.device)

    def kept_length(self, new_tokens: Sequence[int], eos_token_ids: Sequence[int]) -> int:
        """New tokens up to and including the first EOS or the token that completes a stop string."""
        eos = set(eos_token_ids)
        text = None
        for t, token in enumerate(new_tokens):
            if token in eos:
                return t + 1
            if self.stops:
                if text is None:  # a stop string can only be hit if the whole text holds one
                    full = self.tokenizer.decode(list(new_tokens))
                    text = full if any(stop in full for stop, _ in self.stops) else ""
                if text:
                    window = list(new_tokens[: t + 1])
                    if any(stop in self.tokenizer.decode(window[-k:]) for stop, k in self.stops):
                        return t + 1
        return len(new_tokens)


def fast_greedy_supported(model, generation_kwargs: Mapping[str, Any]) -> bool:
    """Whether :func:`greedy_decode` reproduces ``model.generate(**generation_kwargs)`` (greedy only)."""
    kwargs = dict(generation_kwargs)
    if set(kwargs) - _KNOWN_KWARGS:
        return False
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = kwargs.get("temperature", 0.0) != 0.0 and getattr(
            model.generation_config, "do_sample", False
        )
    if do_sample:
        return False
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if any(getattr(gen, name, None) not in (None, [], {}) for name in _UNSUPPORTED_WHEN_SET):
            return False
        if (getattr(gen, "num_beams", 1) or 1) > 1 or (getattr(gen, "min_length", 0) or 0) > 0:
            return False
        if getattr(gen, "renormalize_logits", False) or getattr(gen, "remove_invalid_values", False):
            return False
        if getattr(gen, "encoder_no_repeat_ngram_size", 0) or getattr(gen, "epsilon_cutoff", 0.0):
            return False
        if getattr(gen, "cache_implementation", None) not in (None, "dynamic"):
            return False
    return True


def _processors(model, no_repeat_ngram_size: int | None, repetition_penalty: float | None):
    """The logits processors ``generate`` builds for these settings (same classes, same order)."""
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    gen = getattr(model, "generation_config", None)
    if repetition_penalty is None:
        repetition_penalty = getattr(gen, "repetition_penalty", None)
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = getattr(gen, "no_repeat_ngram_size", None)
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if no_repeat_ngram_size is not None and no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    return processors


@dataclass
class _Rows:
    """The rows in the forward pass (those not yet ended; all of them with ``prune=False``)."""

    index: torch.Tensor  # the original batch index of each row
    seqs: torch.Tensor  # [rows, prompt + steps]: the prompt and the new tokens so far
    step_input: torch.Tensor  # the tokens the next forward pass reads
    positions: torch.Tensor  # their position ids
    mask: torch.Tensor | None  # 2D attention mask (None: all ones, which generate drops)
    cache: Any  # the KV cache

    @classmethod
    def start(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Rows:
        """The prefill inputs of a left-padded batch: position ids and mask as ``generate`` makes them."""
        from transformers import DynamicCache

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return cls(
            index=torch.arange(input_ids.shape[0], device=input_ids.device),
            seqs=input_ids,
            step_input=input_ids,
            positions=positions,
            mask=None if bool((attention_mask == 1).all()) else attention_mask,
            cache=DynamicCache(config=model.config.get_text_config(decoder=True)),
        )

    def next_tokens(self, model, processors) -> torch.Tensor:
        """One forward pass: the greedy next token of each row (float32 logits, then the processors)."""
        outputs = model(
            input_ids=self.step_input,
            attention_mask=self.mask,
            position_ids=self.positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
        )
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        return processors(self.seqs, logits).argmax(dim=-1)

    def select(self, keep: torch.Tensor) -> None:
        """Only the rows ``keep`` (positions in the batch) go on: the others leave it and the KV cache."""
        self.cache.batch_select_indices(keep)
        self.index, self.seqs, self.positions = self.index[keep], self.seqs[keep], self.positions[keep]
        if self.mask is not None:
            self.mask = self.mask[keep]

    def advance(self, next_tokens: torch.Tensor) -> None:
        """The next forward pass reads ``next_tokens`` at the next position."""
        self.step_input = next_tokens[:, None]
        self.positions = self.positions[:, -1:] + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)


def _ended(next_tokens, new_tokens, eos: torch.Tensor, stops: StopStrings | None, last: bool) -> torch.Tensor:
    """Rows that end with this step: at an EOS id, at a stop string (in ``new_tokens``), or at the budget."""
    ended = torch.isin(next_tokens, eos)
    if stops:
        ended |= stops.hit(new_tokens)
    if last:
        ended[:] = True
    return ended


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    tokenizer=None,
    stop_sequences: Sequence[str] = (),
    no_repeat_ngram_size: int | None = None,
    repetition_penalty: float | None = None,
    prune: bool = True,
) -> Generated:
    """Greedy decoding of a left-padded batch; see the module docstring.

    ``stop_sequences`` (needs ``tokenizer``): lm-eval ``until`` strings, the EOS text included as
    lm-eval adds it. ``no_repeat_ngram_size`` / ``repetition_penalty``: ``None`` takes the model's
    generation config, as ``generate`` does.
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    state = _Rows.start(model, input_ids, attention_mask)
    processors = _processors(model, no_repeat_ngram_size, repetition_penalty)
    stops = StopStrings(tokenizer, stop_sequences) if stop_sequences else None
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=input_ids.dtype)
    out = torch.full((batch, prompt_len + max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    out[:, :prompt_len] = input_ids
    kept = [max_new_tokens] * batch
    live = torch.ones(batch, dtype=torch.bool, device=device)  # prune=False: rows not yet ended
    steps = row_steps = 0
    for step in range(max_new_tokens):
        next_tokens = state.next_tokens(model, processors)
        row_steps += state.seqs.shape[0]
        if not prune:
            next_tokens = torch.where(live, next_tokens, torch.full_like(next_tokens, pad_token_id))
        state.seqs = torch.cat([state.seqs, next_tokens[:, None]], dim=-1)
        out[state.index, prompt_len + step] = next_tokens
        steps = step + 1
        ended = _ended(next_tokens, state.seqs[:, prompt_len:], eos, stops, last=steps == max_new_tokens)
        if not prune:
            ended &= live
        for row in state.index[ended].tolist():
            kept[row] = steps
        if not prune:
            live &= ~ended
            if not bool(live.any()):
                break
        elif bool(ended.all()):
            break
        elif bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            state.select(keep)
            next_tokens = next_tokens[keep]
        state.advance(next_tokens)
    # one forward pass per step
    return Generated(
        sequences=out[:, : prompt_len + steps], kept=kept, steps=steps, forwards=steps, row_steps=row_steps
    )
