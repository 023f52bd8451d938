"""The teacher-output cache: what a method reads from it equals what the live teacher gave it, a run whose
examples are all stored does not load the teacher, and only whole shards are ever read."""

from __future__ import annotations

import pytest
import torch
from ctkd_bench.methods.sra import token_mass

import ctkd_bench.runner as runner
from ctkd_bench import models, sweep, zoo
from ctkd_bench.api import ModelOutputs, Needs
from ctkd_bench.data.batch import DistillBatch, SideBatch
from ctkd_bench.runner import MethodRun, TrainConfig, run
from ctkd_bench.teacher_cache import Features, TeacherCache, restrict, store_identity

# every built-in method that reads the teacher across tokenizers, in one lockstep group
METHODS = ["token-kld", "uld", "mined", "dskd", "multilevel-ot", "alm", "sra"]


def _curves_equal(a: dict, b: dict) -> None:
    assert len(a["losses"]["curve"]) == len(b["losses"]["curve"])
    for left, right in zip(a["losses"]["curve"], b["losses"]["curve"]):
        for key in set(left) - {"seconds"}:
            assert left[key] == pytest.approx(right[key], abs=1e-6), (a["label"], left["step"], key)


def test_every_method_from_the_cache_equals_the_live_run_and_loads_no_teacher(
    tmp_path, tiny_request, monkeypatch
):
    """Runs of 2 examples per batch fill the cache; runs of 3 per batch (the same six examples, other
    paddings) then read every feature from it without loading the teacher, and each logged value equals
    that of the same runs with the live teacher within 1e-6."""
    root = tmp_path / "teacher-outputs"
    methods = [MethodRun(m) for m in METHODS]
    fill = run(
        tiny_request(methods, train=TrainConfig(steps=3, batch_size=2, max_length=96), teacher_cache=root)
    )
    assert all(o.status == "finished" for o in fill)
    for outcome in fill:  # one lockstep group: every batch ran the teacher and was stored
        use = outcome.record["cost"]["teacher_cache"]
        assert (use["batches_live"], use["batches_from_cache"]) == (3, 0)

    three = TrainConfig(steps=2, batch_size=3, max_length=96)
    live = run(tiny_request(methods, train=three, results_dir=tmp_path / "live"))
    loaded = []
    load_model = zoo.load_model
    monkeypatch.setattr(
        runner.zoo, "load_model", lambda spec, **kw: loaded.append(spec.name) or load_model(spec, **kw)
    )
    lines: list[str] = []
    cached = run(
        tiny_request(methods, train=three, results_dir=tmp_path / "cached", teacher_cache=root),
        log=lines.append,
    )

    assert "tiny-gemma3" not in loaded and loaded  # the students were loaded, the teacher was not
    assert any(
        line.startswith("teacher: all 6 examples' features (h2, q1) read from the teacher-output cache")
        for line in lines
    )
    for a, b in zip(live, cached):
        assert a.status == b.status == "finished"
        assert a.record["config_hash"] == b.record["config_hash"]  # the cache is not in a run's identity
        _curves_equal(a.record, b.record)
        use = b.record["cost"]["teacher_cache"]
        assert (use["batches_live"], use["batches_from_cache"]) == (0, 2)
        assert "teacher_cache" not in a.record["cost"]
    features = {o.label: o.record["cost"]["teacher_cache"]["features"] for o in cached}
    assert features["token-kld"] == ["h2"]  # what each method declared, and no more
    # its response logits: the stored head on the stored last layer, at the response positions
    assert features["uld"] == ["h2", "response logits (from h, head)"]
    assert features["sra"] == ["h2", "q1"]


def _side(ids: torch.Tensor, mask: torch.Tensor) -> SideBatch:
    size, length = ids.shape
    zeros = torch.zeros(size, dtype=torch.long)
    return SideBatch(
        ids, mask, torch.full_like(ids, -100), torch.zeros(size, length, 2, dtype=torch.long), zeros, zeros
    )


def _batch(rows: list[list[int]]) -> DistillBatch:
    """A batch of the given teacher token rows, right-padded (only the teacher side matters here)."""
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    empty = torch.zeros(len(rows), 0, 4, dtype=torch.long)
    return DistillBatch(
        _side(ids, mask),
        _side(ids, mask),
        empty,
        empty[..., 0].bool(),
        empty[..., :2],
        empty[..., 0].bool(),
        ("x",) * len(rows),
    )


def _live(teacher, batch: DistillBatch) -> ModelOutputs:
    teacher.set_attn_implementation("eager")
    needs = Needs(teacher_hidden_states=True, teacher_attentions=True, teacher_logits=True)
    return models.teacher_forward(teacher, batch, needs, teacher.config.vocab_size)


@pytest.fixture
def tiny_teacher():
    return zoo.load_model(zoo.resolve("tiny-gemma3")).eval()


def _store(tmp_path, teacher) -> TeacherCache:
    cache = TeacherCache(tmp_path, store_identity("tiny-gemma3", seed=0, dtype="float32", device="cpu"))
    cache.save_teacher(teacher, teacher.config.vocab_size, zoo.embedding_scale(teacher))
    return cache


def test_stored_rows_are_read_back_at_their_positions_and_the_rest_is_nan_or_none(tmp_path, tiny_teacher):
    """Features written from one batch, read in another (other order, other padding): hidden states equal
    at the real positions and zero on padding, undeclared layers are None, the attention is the stored
    last-query row and NaN on every other row, so SRA's token mass is the live one."""
    layers = tiny_teacher.config.num_hidden_layers
    first, second = [5, 6, 7, 8, 9], [10, 11, 12]
    written = _batch([first, second])
    live = _live(tiny_teacher, written)
    features = Features(hidden=frozenset({layers}), attention=frozenset({0}), rows="last", logits=True)
    cache = _store(tmp_path, tiny_teacher)
    cache.write(written, live, features)
    cache.flush()

    other = _batch([second, first])  # swapped: the short row now pads to five, the long one not at all
    read = TeacherCache(tmp_path, cache.identity).read(other, features, layers)  # a new reader: from disk
    assert read.hidden_states[0] is None and read.hidden_states[layers] is not None
    torch.testing.assert_close(
        read.hidden_states[layers][0, :3], live.hidden_states[layers][1, :3], rtol=0, atol=0
    )
    torch.testing.assert_close(read.hidden_states[layers][1], live.hidden_states[layers][0], rtol=0, atol=0)
    assert read.hidden_states[layers][0, 3:].abs().sum() == 0  # padding
    torch.testing.assert_close(read.logits[1], live.logits[0], rtol=0, atol=1e-5)
    attention = read.attentions[0]
    assert read.attentions[1] is None
    assert torch.isnan(attention[0, :, 0]).all() and not torch.isnan(attention[0, :, 2]).any()
    torch.testing.assert_close(
        token_mass(attention, other.teacher.attention_mask)[0, :3],
        token_mass(live.attentions[0], written.teacher.attention_mask)[1, :3],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        read.head(read.hidden_states[layers][1, :2], torch.tensor([3, 4])),
        live.head(live.hidden_states[layers][0, :2], torch.tensor([3, 4])),
    )

    missing = _batch([first, [1, 2]])  # one example never stored: the batch is not served
    assert cache.read(missing, features, layers) is None


def test_a_reader_sees_only_whole_shards(tmp_path, tiny_teacher):
    """Pending features are invisible to other processes until flushed; a half-written temporary file
    beside the shards is never read."""
    layers = tiny_teacher.config.num_hidden_layers
    batch = _batch([[5, 6, 7]])
    features = Features(hidden=frozenset({layers}))
    writer = _store(tmp_path, tiny_teacher)
    writer.write(batch, _live(tiny_teacher, batch), features)
    (writer.dir / ".shard-1-abc.safetensors.tmp").write_bytes(b"half a shard")
    assert writer.read(batch, features, layers) is not None  # the writer reads its own pending features
    assert TeacherCache(tmp_path, writer.identity).read(batch, features, layers) is None
    writer.flush()
    assert TeacherCache(tmp_path, writer.identity).read(batch, features, layers) is not None


def test_what_a_method_did_not_declare_does_not_reach_it(tiny_teacher):
    layers = tiny_teacher.config.num_hidden_layers
    live = _live(tiny_teacher, _batch([[5, 6, 7]]))
    needs = Needs(
        teacher_hidden_states=True, teacher_layers={-1}, teacher_attentions=True, teacher_attention_layers={0}
    )
    cut = restrict(live, needs, layers)
    assert cut.logits is None
    assert [h is not None for h in cut.hidden_states] == [i == layers for i in range(layers + 1)]
    assert [a is not None for a in cut.attentions] == [i == 0 for i in range(layers)]
    assert Features.of(needs, layers).names() == [f"h{layers}", "a0"]
    assert Features.of(Needs(teacher_logits=True), layers).names() == [f"h{layers}"]
    with pytest.raises(ValueError, match="out of range"):
        Features.of(Needs(teacher_hidden_states=True, teacher_layers={layers + 1}), layers)


def test_experiment_files_take_the_cache(tmp_path):
    def load(value):
        path = tmp_path / "e.yaml"
        path.write_text(
            f"name: e\npairs: [tiny-gemma3:tiny-smollm2]\nmethods: [sft]\nteacher_cache: {value}\n"
        )
        return sweep.load_experiment(path).teacher_cache

    assert load("true").endswith("teacher-outputs")
    assert load("false") is None
    assert load(str(tmp_path / "store")) == str(tmp_path / "store")
    with pytest.raises(sweep.UserError, match="teacher_cache must be true, false or a folder"):
        load("3")
