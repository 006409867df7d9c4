"""Issue 18, finding 8: hostile data is skipped and counted; a stage that keeps nothing fails.

A PNG of a few hundred KB can claim 180 megapixels: PIL raised ``DecompressionBombError``
out of the reader (the whole bridge stage failed, on every retry), and decoded images of
89-179 megapixels in full with only a warning. Now each is skipped as ``oversized_image``
above ``DatasetRef.maxImagePixels``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer.config import BridgePrompts, DatasetRef
from visionr1_trainer.data import read_bridge_source, read_rl, rl_row


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid greyscale PNG of width x height zero pixels, compressed as it streams
    (a 180-megapixel one is ~180 KB on disk and never in memory here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def source_with(tmp_path: Path, images: dict[str, Path]) -> Path:
    rows = [{"id": name, "image": path.name, "question": f"q {name}", "answer": "1"} for name, path in images.items()]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "rows.jsonl"


def small_png(path: Path, size=(16, 16)) -> Path:
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def test_a_decompression_bomb_is_skipped_and_counted_not_fatal(tmp_path):
    rows = source_with(tmp_path, {"bomb": bomb_png(tmp_path / "bomb.png", 15000, 12000),  # 180 Mpx
                                  "ok": small_png(tmp_path / "ok.png")})
    result = read_bridge_source(DatasetRef(source=str(rows)), cache_dir=tmp_path / "c")
    assert [e.id for e in result.items] == ["ok"]
    assert dict(result.skipped) == {"oversized_image": 1}


def test_an_image_in_pils_warning_range_is_skipped_too(tmp_path):
    rows = source_with(tmp_path, {"big": bomb_png(tmp_path / "big.png", 10000, 10000)})  # 100 Mpx
    result = read_bridge_source(DatasetRef(source=str(rows)), cache_dir=tmp_path / "c")
    assert result.items == [] and dict(result.skipped) == {"oversized_image": 1}


def test_max_image_pixels_is_a_setting(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    small_png(tmp_path / "a.png", (64, 64))
    (tmp_path / "rl.jsonl").write_text(json.dumps(rl_row("r", "q", "1", ["a.png"])) + "\n")
    assert read_rl(DatasetRef(source=str(tmp_path / "rl.jsonl")), cache_dir=tmp_path / "c").items
    bounded = read_rl(DatasetRef(source=str(tmp_path / "rl.jsonl"), maxImagePixels=4095), cache_dir=tmp_path / "c")
    assert bounded.items == [] and dict(bounded.skipped) == {"oversized_image": 1}


def test_a_bridge_stage_with_no_usable_rows_fails_naming_why(tmp_path):
    from test_bridge_pipeline import make_config

    from visionr1_trainer.bridge import pipeline

    rows = source_with(tmp_path, {"bomb": bomb_png(tmp_path / "bomb.png", 15000, 12000)})
    out = tmp_path / "bridge"
    with pytest.raises(pipeline.NothingKept, match="no usable rows.*oversized_image"):
        pipeline.run(make_config(out, rows))
    assert not (out / "dataset" / "_COMMITTED.json").exists()


def test_a_bridge_stage_that_keeps_nothing_commits_nothing(tmp_path, monkeypatch):
    """Every verdict a drop (here: the filters refuse every answer): no empty data set."""
    from test_bridge_pipeline import make_config

    from visionr1_trainer.bridge import pipeline

    rows = source_with(tmp_path, {"a": small_png(tmp_path / "a.png"), "b": small_png(tmp_path / "b.png", (17, 17))})
    monkeypatch.setattr(pipeline, "filter_reason", lambda parsed, answer, filters: "wrong_answer")
    monkeypatch.setattr(pipeline, "check_not_all_failed", lambda rows, role, shard: None)
    out = tmp_path / "bridge"
    with pytest.raises(pipeline.NothingKept, match="kept 0 of 2"):
        pipeline.run(make_config(out, rows))
    assert not (out / "dataset" / "_COMMITTED.json").exists()


def test_bridge_prompts_are_bounded_so_the_config_map_fits():
    with pytest.raises(ValueError, match="reasoning"):
        BridgePrompts(reasoning="x" * 16385)
    assert BridgePrompts(reasoning="x" * 16384).reasoning


def test_jsonl_is_read_line_by_line(tmp_path, monkeypatch):
    """The reader never reads a jsonl file whole (Path.read_text is not called)."""
    small_png(tmp_path / "a.png")
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(rl_row(f"r{i}", "q", "1", ["a.png"])) + "\n"
                                               for i in range(5)) + "{torn\n")
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read whole"))
    result = read_rl(DatasetRef(source=str(tmp_path / "rl.jsonl")), cache_dir=tmp_path / "c")
    assert len(result.items) == 5 and dict(result.skipped) == {"unparsable_row": 1}
