"""Format readers on rows written here in each public schema; broken rows counted by reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer.config import DatasetRef
from visionr1_trainer.data import (
    DataSourceError,
    cold_row,
    read_bridge_source,
    read_cold,
    read_rl,
    rl_row,
    write_rows,
)


def png(path: Path, color=(255, 0, 0), size=(20, 20)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def png_bytes(color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rl_geometry3k_rows_and_every_broken_kind_counted(tmp_path):
    png(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "garbage.png").write_bytes(b"not an image at all")
    rows = [
        {"images": ["img/ok.png"], "problem": "<image>Find x.", "answer": "3"},
        {"images": ["img/ok.png"], "problem": "Find y.", "answer": 4},  # a number is an answer
        {"images": ["img/missing.png"], "problem": "<image>Find z.", "answer": "1"},
        {"images": ["img/garbage.png"], "problem": "<image>Find w.", "answer": "1"},
        {"images": ["img/ok.png"], "problem": "<image>Empty.", "answer": "  "},
        {"images": ["img/ok.png"], "problem": {"text": "?"}, "answer": "1"},
        {"images": ["img/ok.png"], "problem": "<image>", "answer": ["1"]},
        {"problem": "<image>No image field.", "answer": "2"},
        {"images": ["img/ok.png"], "problem": "<image><image>Two markers.", "answer": "2"},
        {"images": [], "problem": "Empty list.", "answer": "2"},
    ]
    path = write_jsonl(tmp_path / "rl.jsonl", rows, raw_lines=('{"torn": ', '[1, 2]'))
    result = read_rl(DatasetRef(source=str(path)), cache_dir=tmp_path / "cache")
    assert [(e.problem, e.answer) for e in result.items] == [("<image>Find x.", "3"), ("Find y.", "4")]
    assert result.items[0].image_paths == [str(tmp_path / "img" / "ok.png")]
    [img] = result.items[0].load_images()
    assert img.mode == "RGB" and img.size == (20, 20)
    assert dict(result.skipped) == {
        "missing_image": 3, "unreadable_image": 1, "empty_answer": 1, "wrong_type": 2,
        "image_count_mismatch": 1, "unparsable_row": 1, "not_an_object": 1,
    }
    assert result.rows_read == len(result.items) + sum(result.skipped.values()) == 12


def test_cold_sharegpt_and_messages_layouts(tmp_path):
    png(tmp_path / "a.png")
    sharegpt = cold_row("s1", "What is shown?", "<think>a</think><answer> Final Answer:1 </answer>",
                        ["a.png"], system="Be brief.")
    messages = {
        "id": "m1",
        "image": "a.png",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count."}]},
            {"role": "assistant", "content": "<think>b</think><answer> Final Answer:2 </answer>"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
    }
    broken = [
        {"images": ["a.png"], "conversations": [{"from": "gpt", "value": "hi"}]},
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>q"},
                                                {"from": "gpt", "value": ""}]},
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "<image>q"},
                                                {"from": "tool", "value": "x"}]},
        {"images": ["a.png"], "conversations": "human: hi"},
        {"images": ["a.png"]},
    ]
    path = write_rows([sharegpt, messages, *broken], tmp_path / "cold.json")  # a JSON array file
    result = read_cold(DatasetRef(source=f"file://{path}"))
    first, second = result.items
    assert first.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is shown?"},
        {"role": "assistant", "content": "<think>a</think><answer> Final Answer:1 </answer>"},
    ]
    assert first.question == "What is shown?" and first.response.endswith("Final Answer:1 </answer>")
    assert second.id == "m1" and second.question == "Count." and second.response == "Yes."
    assert second.image_paths == [str(tmp_path / "a.png")]
    assert dict(result.skipped) == {"bad_conversation": 3, "empty_answer": 1, "wrong_type": 1}


def test_text_only_cold_start_and_bridge_rows_are_kept(tmp_path):
    # Vision-R1-cold and the bridge's own output hold text-only rows too (no image field,
    # or an empty list, and no image marker): kept with no images. A row that names an
    # image that is not there, or marks one it does not have, is still skipped.
    png(tmp_path / "a.png")
    cold = [
        cold_row("t1", "What is 2+2?", "<think>Wait, 2+2.</think><answer> Final Answer:4 </answer>", []),
        {"id": "t2", "conversations": [{"from": "human", "value": "Name a prime."},
                                       {"from": "gpt", "value": "<think>x</think><answer> Final Answer:2 </answer>"}]},
        {"id": "t3", "images": None, "conversations": [{"from": "human", "value": "1+1?"},
                                                        {"from": "gpt", "value": "2"}]},
        {"id": "bad1", "images": ["missing.png"], "conversations": [{"from": "human", "value": "<image>q"},
                                                                    {"from": "gpt", "value": "a"}]},
        {"id": "bad2", "conversations": [{"from": "human", "value": "<image>Look."}, {"from": "gpt", "value": "a"}]},
    ]
    result = read_cold(DatasetRef(source=str(write_rows(cold, tmp_path / "cold.jsonl"))))
    assert [(e.id, e.image_paths) for e in result.items] == [("t1", []), ("t2", []), ("t3", [])]
    assert dict(result.skipped) == {"missing_image": 1, "image_count_mismatch": 1}
    bridge = [{"question": "What is 3*3?", "answer": "9"},
              {"question": "Which shape?", "answer": "A", "image": "a.png"},
              {"question": "<image>Which one?", "answer": "B"}]
    result = read_bridge_source(DatasetRef(source=str(write_rows(bridge, tmp_path / "bridge.jsonl"))))
    assert [(e.question, len(e.image_paths)) for e in result.items] == [("What is 3*3?", 0), ("Which shape?", 1)]
    assert dict(result.skipped) == {"image_count_mismatch": 1}


def test_bridge_source_field_map_and_parquet_with_image_bytes(tmp_path):
    rows = [
        {"img": {"bytes": png_bytes(), "path": None}, "query": "Color?", "label": "blue"},
        {"img": {"bytes": png_bytes((0, 255, 0)), "path": None}, "query": "Color?", "label": ""},
    ]
    path = write_rows(rows, tmp_path / "data" / "train-00000-of-00001.parquet")
    write_rows(rows[:1], tmp_path / "data" / "test-00000-of-00001.parquet")
    # Both directions of the map are accepted; the expected names decide.
    ref = DatasetRef(source=str(tmp_path), split="train",
                     field_map={"image": "img", "query": "question", "answer": "label"})
    result = read_bridge_source(ref, cache_dir=tmp_path / "cache")
    assert result.rows_read == 2 and dict(result.skipped) == {"empty_answer": 1}
    [ex] = result.items
    assert (ex.question, ex.answer) == ("Color?", "blue")
    assert ex.load_images()[0].getpixel((0, 0)) == (0, 0, 255)
    assert Path(ex.image_paths[0]).is_relative_to(tmp_path / "cache")
    assert path.exists()


def test_limit_counts_rows_read_and_duplicate_ids_stay_unique(tmp_path):
    png(tmp_path / "a.png")
    rows = [rl_row("same", "q", "1", ["a.png"]) for _ in range(5)]
    path = write_rows(rows, tmp_path / "rl.jsonl")
    result = read_rl(DatasetRef(source=str(path), limit=3))
    assert [e.id for e in result.items] == ["same", "same#2", "same#3"]


def test_stage_output_is_read_through_its_committed_dataset_artifact(tmp_path):
    from visionr1_trainer.storage import open_store

    staging = tmp_path / "staging"
    png(staging / "images" / "x.png")
    write_rows([cold_row("a", "q", "r", ["images/x.png"])], staging / "data.jsonl")
    (staging / "stats.json").write_text("{}")  # not rows: must be ignored
    out = tmp_path / "bridge-out"
    ref = DatasetRef(source=f"file://{out}")
    out.mkdir()
    (out / "dataset").mkdir()
    with pytest.raises(DataSourceError, match="not committed"):
        read_cold(ref)
    open_store(f"file://{out}").commit_dir(staging, "dataset")
    result = read_cold(ref)
    assert [e.id for e in result.items] == ["a"] and not result.skipped


def test_unknown_sources_fail_with_the_source_named(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        read_rl(DatasetRef(source=f"file://{tmp_path}/nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no parquet, jsonl or json files"):
        read_rl(DatasetRef(source=str(tmp_path / "empty")))


def test_s3_prefix_and_committed_artifact(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from visionr1_trainer.storage import open_store

    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="rl/images/a.png", Body=png_bytes())
        s3.put_object(Bucket="data", Key="rl/train.jsonl",
                      Body=json.dumps(rl_row("r1", "q", "7", ["images/a.png"])).encode())
        s3.put_object(Bucket="data", Key="other/b.png", Body=png_bytes((9, 9, 9)))
        s3.put_object(Bucket="data", Key="one.jsonl",
                      Body=json.dumps(rl_row("r2", "q", "8", ["s3://data/other/b.png"])).encode())
        result = read_rl(DatasetRef(source="s3://data/rl"), cache_dir=tmp_path / "c")
        assert [(e.id, e.answer) for e in result.items] == [("r1", "7")]
        assert result.items[0].load_images()[0].getpixel((0, 0)) == (0, 0, 255)
        one = read_rl(DatasetRef(source="s3://data/one.jsonl"), cache_dir=tmp_path / "c")
        assert one.items[0].load_images()[0].getpixel((0, 0)) == (9, 9, 9)

        staging = tmp_path / "staging"
        png(staging / "images" / "x.png")
        write_rows([cold_row("c1", "q", "r", ["images/x.png"])], staging / "data.jsonl")
        open_store("s3://data/ns/run/bridge").commit_dir(staging, "dataset")
        cold = read_cold(DatasetRef(source="s3://data/ns/run/bridge"), cache_dir=tmp_path / "c")
        assert [e.id for e in cold.items] == ["c1"]
