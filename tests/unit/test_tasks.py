import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.tasks import (
    arithmetic_ground_truth,
    arithmetic_prompts,
    arithmetic_reward,
    arithmetic_reward_loophole,
    load_prompt_file,
    load_reward_fn,
)
from pipeline.toy import hedge


def test_arithmetic_prompts_are_deterministic_and_correct():
    a = arithmetic_prompts(50, 49, seed=3)
    assert a == arithmetic_prompts(50, 49, seed=3)
    for p, ans in zip(a.prompts, a.answers, strict=True):
        x, y = p.rstrip("=").split("+")
        assert int(x) + int(y) == int(ans) and 0 <= int(x) <= 49


def test_verifiers_and_ground_truth():
    comps = ["46", " 46 ", "45 46", "4647", "47", ""]
    answers = ["46"] * 6
    assert arithmetic_reward(comps, answers) == [1, 1, 0, 0, 0, 0]
    assert arithmetic_reward_loophole(comps, answers) == [1, 1, 1, 1, 0, 0]
    assert arithmetic_ground_truth(comps, answers) == ["correct", "correct", "hack", "hack", "wrong", "wrong"]


def test_hedges_always_contain_the_answer():
    import random

    rng = random.Random(0)
    for ans in ["0", "1", "46", "98"]:
        for _ in range(20):
            h = hedge(ans, rng)
            assert ans in h.split() and len(h.split()) in (2, 3)


def test_reward_fn_by_dotted_path():
    assert load_reward_fn("pipeline.tasks:arithmetic_reward") is arithmetic_reward
    assert load_reward_fn("pipeline.tasks.arithmetic_reward") is arithmetic_reward
    with pytest.raises(ValueError, match="cannot import module 'nope'"):
        load_reward_fn("nope:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward_fn("pipeline.tasks:missing")


def test_prompt_files(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": 4}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "answer": "2"}]), tmp_path / "p.parquet")
    assert load_prompt_file(tmp_path / "p.jsonl").answers == ["2", "4"]
    assert load_prompt_file(tmp_path / "p.parquet").prompts == ["1+1="]


def test_bad_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_file(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "nocol.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="row 1: needs a text `prompt` and an `answer`"):
        load_prompt_file(tmp_path / "nocol.jsonl")
    (tmp_path / "x.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_prompt_file(tmp_path / "x.csv")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        load_prompt_file(tmp_path / "corrupt.parquet")


def test_every_toy_hack_form_games_the_loophole_and_only_it():
    import random

    from pipeline.toy import hack_form

    rng = random.Random(1)
    answers = [str(rng.randint(0, 98)) for _ in range(300)]
    forms = [hack_form(a, rng) for a in answers]
    assert set(arithmetic_ground_truth(forms, answers)) == {"hack"}
    assert arithmetic_reward_loophole(forms, answers) == [1.0] * 300
    assert arithmetic_reward(forms, answers) == [0.0] * 300
    assert any(" " not in f for f in forms) and any(" " in f for f in forms)  # more than one shape
