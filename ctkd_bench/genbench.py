"""Generation throughput: HF ``generate`` (the old eval path) vs :func:`greedy_decode` vs a plain loop.

``python -m ctkd_bench.genbench [--model smollm2-135m] [--prompts 32] [--batch-sizes 8,16,32]
[--max-new-tokens 128] [--repeats 2] [--data-dir ../shared/data]``

The first N Dolly test prompts, tokenized and left-truncated as the eval does (lm-eval HFLM: the
tokenizer's prefix specials, the last 256 tokens), sorted longest first and batched as lm-eval's
Collator does; greedy with ``no_repeat_ngram_size`` 6 and lm-eval's stops (``### Instruction`` and the
EOS text). Per batch size and path: the better of ``--repeats`` timings (old and new run back to back
in each repeat; the plain loop once), *kept* tokens/s (new tokens up to each row's EOS or stop string: the same count for
all three paths), rows x steps/s (padding rows included) and whether the kept tokens and the final
texts match ``generate``'s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctkd_bench.evaluation import STOP_SEQUENCES, _eos_token_ids
from ctkd_bench.generation import StopStrings, greedy_decode

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _batches(tokenizer, prompts: list[str], batch_size: int, max_prompt_tokens: int):
    order = sorted(prompts, key=lambda p: (-len(tokenizer.encode(p)), p))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(order), batch_size):
            enc = tokenizer(order[i : i + batch_size], padding="longest", return_tensors="pt")
            yield enc["input_ids"][:, -max_prompt_tokens:], enc["attention_mask"][:, -max_prompt_tokens:]
    finally:
        tokenizer.padding_side = padding_side


def _old(model, tokenizer, ids, mask, max_new_tokens, eos, stops):
    from lm_eval.models.utils_hf import stop_sequences_criteria

    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_length=ids.shape[1] + max_new_tokens,
        stopping_criteria=stop_sequences_criteria(tokenizer, stops, ids.shape[1], ids.shape[0]),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        do_sample=False,
        no_repeat_ngram_size=6,
        repetition_penalty=1.0,
        eos_token_id=eos,
    )


def _text(tokenizer, new_tokens, stops) -> str:
    from lm_eval.models.utils import postprocess_generated_text

    return postprocess_generated_text(tokenizer.decode(new_tokens, skip_special_tokens=True), stops, None)


def run(
    model, tokenizer, prompts, batch_sizes, max_new_tokens=128, repeats=2, max_prompt_tokens=256
) -> list[dict]:
    model.eval()
    eos = _eos_token_ids(model, tokenizer)
    stops = [*STOP_SEQUENCES, tokenizer.decode(tokenizer.eos_token_id)]  # lm-eval adds the EOS text
    checker = StopStrings(tokenizer, stops)
    rows = []
    for batch_size in batch_sizes:
        batches = list(_batches(tokenizer, prompts, batch_size, max_prompt_tokens))
        best = {"generate": float("inf"), "new": float("inf"), "bare": float("inf")}
        kept = row_steps = 0
        same_tokens = same_text = 0
        for repeat in range(repeats):
            for path in ("generate", "new", "bare") if repeat == 0 else ("generate", "new"):
                start = time.perf_counter()
                results = []
                with torch.no_grad():
                    for ids, mask in batches:
                        if path == "generate":
                            results.append(_old(model, tokenizer, ids, mask, max_new_tokens, eos, stops))
                        else:
                            results.append(
                                greedy_decode(
                                    model,
                                    ids,
                                    mask,
                                    max_new_tokens=max_new_tokens,
                                    eos_token_ids=eos,
                                    pad_token_id=tokenizer.pad_token_id,
                                    tokenizer=tokenizer,
                                    stop_sequences=stops,
                                    no_repeat_ngram_size=6,
                                    repetition_penalty=1.0,
                                    prune=path == "new",
                                )
                            )
                best[path] = min(best[path], time.perf_counter() - start)
                if repeat == 0:
                    if path == "generate":
                        old_out = [(ids.shape[1], out) for (ids, _), out in zip(batches, results)]
                    elif path == "new":
                        new_out = results
                        kept = sum(sum(g.kept) for g in results)
                    else:
                        row_steps = sum(g.row_steps for g in results)
        for (prompt_len, old), new in zip(old_out, new_out):
            for r in range(old.shape[0]):
                old_new = old[r, prompt_len:].tolist()
                n = new.kept[r]
                mine = new.sequences[r, prompt_len : prompt_len + n].tolist()
                same_tokens += old_new[:n] == mine and checker.kept_length(old_new, eos) == n
                same_text += _text(tokenizer, old_new, stops) == _text(tokenizer, mine, stops)
        row = {"batch": batch_size, "kept_tokens": kept, "bare_row_steps": row_steps, "n": len(prompts)}
        for path, seconds in best.items():
            row[f"{path}_s"] = seconds
            row[f"{path}_tps"] = kept / seconds
        row["bare_row_steps_per_s"] = row_steps / best["bare"]
        row["same_tokens"], row["same_text"] = same_tokens, same_text
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    return (
        f"| {r['batch']} | {r['generate_tps']:.1f} | {r['new_tps']:.1f} | {r['bare_tps']:.1f} "
        f"({r['bare_row_steps_per_s']:.0f} rows*steps/s) | {r['new_tps'] / r['bare_tps']:.2f} | "
        f"{r['new_tps'] / r['generate_tps']:.2f} | {r['kept_tokens']} | {r['same_tokens']}/{r['n']} tokens, "
        f"{r['same_text']}/{r['n']} texts |"
    )


def main(argv: list[str] | None = None) -> None:
    from ctkd_bench import zoo
    from ctkd_bench.data.sources import load_examples

    parser = argparse.ArgumentParser(
        prog="python -m ctkd_bench.genbench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = zoo.resolve(args.model)
    model, tokenizer = zoo.load_model(spec), zoo.load_tokenizer(spec)
    prompts = [ex.prompt for ex in load_examples("dolly", "test", args.data_dir)[: args.prompts]]
    print(
        f"{args.model}, {len(prompts)} Dolly test prompts, <= {args.max_new_tokens} new tokens, greedy, "
        f"best of {args.repeats}, {torch.get_num_threads()} threads; tokens/s = kept tokens/s"
    )
    print(
        "| batch | generate | new (pruned) | bare loop | new/bare | new/generate | kept tokens | same as generate |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    run(
        model,
        tokenizer,
        prompts,
        [int(b) for b in args.batch_sizes.split(",")],
        args.max_new_tokens,
        args.repeats,
    )


if __name__ == "__main__":
    main()
