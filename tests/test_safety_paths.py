"""Issue 18, finding 4: names from a store or a row never resolve outside their root.

An S3 key is chosen by whoever can write the bucket; a row's image path by whoever wrote
the data set. Each must stay inside its cache or data directory, or be skipped and counted:
the readers never write outside the cache, and never read (nor upload to a bridge
endpoint) a file outside the data set, such as a Secret mounted in the pod.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer.config import DatasetRef
from visionr1_trainer.data import read_bridge_source, read_rl, rl_row


def png_bytes(color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "/abs/path", "a//b", "", ".", "a/./b",
                                  "a\\..\\b", "a\x00b"])
def test_inside_refuses_names_that_leave_the_root(tmp_path, name):
    from visionr1_trainer.data.sources import UnsafePath, inside

    with pytest.raises(UnsafePath):
        inside(tmp_path, name)


def test_inside_refuses_a_symlink_out_of_the_root(tmp_path):
    from visionr1_trainer.data.sources import UnsafePath, inside

    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        inside(tmp_path / "root", "link/secret")
    assert inside(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()


def test_s3_keys_with_dot_dot_or_double_slash_write_nothing_outside_the_cache(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    outside = tmp_path / "outside"
    cache = tmp_path / "work" / "cache"
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="rl/images/a.png", Body=png_bytes())
        s3.put_object(Bucket="data", Key="rl/train.jsonl",
                      Body=json.dumps(rl_row("r1", "q", "7", ["images/a.png"])).encode())
        # Climbs out of the cache: <cache>/s3/<hash>/../../../../outside/dotdot.txt
        s3.put_object(Bucket="data", Key="rl/../../../../outside/dotdot.txt", Body=b"planted")
        # ``local / "/abs"`` is "/abs" in pathlib: a key with a second slash is absolute.
        s3.put_object(Bucket="data", Key=f"rl/{outside}/abs.txt", Body=b"planted")
        result = read_rl(DatasetRef(source="s3://data/rl"), cache_dir=cache)
    assert not outside.exists(), sorted(p.name for p in outside.rglob("*"))
    assert [e.id for e in result.items] == ["r1"]
    assert result.skipped["unsafe_object_key"] == 2


def test_row_image_paths_outside_the_data_directory_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "ok.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"  # a file beside the data set, such as a mounted Secret
    secret.write_bytes(png_bytes((1, 2, 3)))
    rows = [
        {"id": "ok", "image": "images/ok.png", "question": "q", "answer": "1"},
        {"id": "abs_inside", "image": str(data / "images" / "ok.png"), "question": "q2", "answer": "1"},
        {"id": "dotdot", "image": "../secret.png", "question": "q", "answer": "1"},
        {"id": "abs", "image": str(secret), "question": "q", "answer": "1"},
        {"id": "file_uri", "image": f"file://{secret}", "question": "q", "answer": "1"},
        {"id": "sneaky", "image": "images/../../secret.png", "question": "q", "answer": "1"},
    ]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = read_bridge_source(DatasetRef(source=str(data / "train.jsonl")), cache_dir=tmp_path / "c")
    assert [e.id for e in result.items] == ["ok", "abs_inside"]
    assert dict(result.skipped) == {"unsafe_image_path": 4}
    assert all(Path(p).resolve().is_relative_to(data.resolve()) for e in result.items for p in e.image_paths)


def test_a_symlinked_image_pointing_out_of_the_data_directory_is_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    (data / "train.jsonl").write_text(json.dumps(rl_row("r", "q", "1", ["link.png"])) + "\n")
    result = read_rl(DatasetRef(source=str(data)), cache_dir=tmp_path / "c")
    assert result.items == [] and dict(result.skipped) == {"unsafe_image_path": 1}
