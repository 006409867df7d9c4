"""The synthetic visual-math generator: exact answers, deterministic by seed, all formats."""

from __future__ import annotations

import hashlib
import json

import pytest

from visionr1_trainer.config import DatasetRef
from visionr1_trainer.data import read_bridge_source, read_cold, read_rl
from visionr1_trainer.data.synthetic import (
    COLORS,
    TASKS,
    generate,
    make_sample,
    teacher_reasoning,
    teacher_response,
)


def digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    a = generate(tmp_path / "a", 10, seed=3, n_eval=5)
    b = generate(tmp_path / "b", 10, seed=3, n_eval=5)
    c = generate(tmp_path / "c", 10, seed=4, n_eval=5)
    assert digest(a.root) == digest(b.root)
    assert digest(a.root) != digest(c.root)
    assert len(list((a.root / "images").iterdir())) == 15


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_every_format_reads_back_whole(tmp_path, file_format):
    s = generate(tmp_path, 10, seed=0, n_eval=5, file_format=file_format)
    bridge = read_bridge_source(DatasetRef(source=str(s.bridge_source)))
    cold = read_cold(DatasetRef(source=str(s.cold_start)))
    rl = read_rl(DatasetRef(source=str(s.rl)))
    ev = read_rl(DatasetRef(source=str(s.eval), split="test"))
    assert [len(r.items) for r in (bridge, cold, rl, ev)] == [10, 10, 10, 5]
    assert not any(r.skipped for r in (bridge, cold, rl, ev))
    assert {e.meta["task"] for e in rl.items} == set(TASKS)
    assert not {e.id for e in ev.items} & {e.id for e in rl.items}
    for b, c, r in zip(bridge.items, cold.items, rl.items):
        scene = json.loads(b.meta["scene"])
        assert b.answer == r.answer == teacher_reasoning(scene)[1]
        assert c.response == teacher_response(scene)
        assert c.response.endswith(f"<answer> Final Answer:{b.answer} </answer>")


def test_answers_follow_the_pixels():
    for i in range(12):
        s = make_sample("color", 0, "train", i)
        colors = {rgb for _, rgb in s.image.getcolors()} - {(255, 255, 255)}
        assert colors == {COLORS[s.scene["color"]]}
        assert s.answer == "ABCD"[["red", "green", "blue", "yellow"].index(s.scene["color"])]
    for i in range(6):
        s = make_sample("count", 0, "train", i)
        colored = {rgb for _, rgb in s.image.getcolors()} - {(255, 255, 255)}
        assert int(s.answer) == len(s.scene["shapes"])
        assert colored == {COLORS[shape["color"]] for shape in s.scene["shapes"]}
        b = make_sample("bar", 0, "train", i)
        assert int(b.answer) == max(b.scene["values"])


def test_teacher_reasoning_self_checks_on_every_task():
    for task in TASKS:
        reasoning, answer = teacher_reasoning(make_sample(task, 1, "train", 0).scene)
        assert answer and ("Wait" in reasoning or "let me check" in reasoning.lower())


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown synthetic task 'pie'.*color"):
        make_sample("pie", 0, "train", 0)


# --- the largest task (data.reflect): the toy problem of the demo and the ablation ------------

def test_largest_answer_follows_the_pixels():
    from visionr1_trainer.data.reflect import COLOR_CHOICES

    for i in range(40):
        s = make_sample("largest", 0, "train", i)
        pixels = {rgb: n for n, rgb in s.image.getcolors()}
        large, small = (pixels[COLORS[s.scene[k]["color"]]] for k in ("large", "small"))
        assert small < 0.5 * large  # the larger shape has more than twice the pixels
        assert s.answer == "ABCD"[COLOR_CHOICES.index(s.scene["large"]["color"])]


def test_largest_teacher_reflects_at_varied_length_and_long_chains_are_less_often_right():
    from visionr1_trainer.data.reflect import reflection_plan

    by_rounds: dict[int, list[bool]] = {}
    waits = []
    for i in range(600):
        s = make_sample("largest", 0, "train", i)
        reasoning, answer = teacher_reasoning(s.scene)
        assert teacher_reasoning(s.scene) == (reasoning, answer)  # a pure function of the scene
        by_rounds.setdefault(reflection_plan(s.scene)[0], []).append(answer == s.answer)
        waits.append(reasoning.count("Wait"))
    assert set(by_rounds) == set(range(6))  # 0..5 rounds of reflection
    accuracy = {k: sum(v) / len(v) for k, v in by_rounds.items()}
    assert accuracy[0] == 1.0  # no doubt voiced, never talked round
    assert accuracy[0] > accuracy[2] > accuracy[4]
    assert sum(waits) / len(waits) > 1 and max(waits) >= 4


def test_largest_cold_start_file_holds_only_the_teachers_right_answers(tmp_path):
    s = generate(tmp_path, 40, seed=0, tasks=("largest",), n_eval=4)
    cold = read_cold(DatasetRef(source=str(s.cold_start)))
    rl = read_rl(DatasetRef(source=str(s.rl)))
    assert 0 < len(cold.items) < len(rl.items) == 40
    answers = {e.id: e.answer for e in rl.items}
    for c in cold.items:
        assert c.response.endswith(f"<answer> Final Answer:{answers[c.id]} </answer>")
