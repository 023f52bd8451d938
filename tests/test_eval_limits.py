"""Per-set evaluation limits: all of one set, the first N of another, in one lm-eval pass."""

from __future__ import annotations

import pytest

from ctkd_bench import zoo
from ctkd_bench.errors import UserError
from ctkd_bench.evaluation import EvalConfig, evaluate


def test_each_set_keeps_its_own_limit(shared_data, tiny_models):
    student, _ = tiny_models
    tokenizer = zoo.load_tokenizer(zoo.resolve("tiny-smollm2"))
    config = EvalConfig(
        tasks=("vicuna", "selfinst"),
        data_dir=str(shared_data),
        limit={"vicuna": 3, "selfinst": 2},
        greedy=True,
        seeds=(10,),
        max_new_tokens=2,
    )
    result = evaluate(student, tokenizer, config, progress=False)
    assert {name: task.n for name, task in result.tasks.items()} == {"vicuna": 3, "selfinst": 2}
    record = result.to_record()
    assert record["protocol"]["limit"] == {"vicuna": 3, "selfinst": 2}


def test_a_limit_for_a_set_that_is_not_evaluated_is_refused():
    with pytest.raises(
        UserError, match="evaluation limit names 'vicuna', which is not one of our evaluated sets"
    ):
        EvalConfig(tasks=("dolly",), limit={"vicuna": 3})
    with pytest.raises(
        UserError, match="evaluation limit of dolly must be a positive integer or null, got 0"
    ):
        EvalConfig(tasks=("dolly",), limit={"dolly": 0})
