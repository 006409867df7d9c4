"""The public data sets read as published: small files built in each one's schema and layout.

Each fixture mirrors a hub repo (file names, README configs, how images are stored) or the
layout its own README describes: nothing is downloaded. Hub names are checked by standing
in for ``datasets.load_dataset`` / ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from visionr1_trainer.config import BenchmarkSpec, DatasetRef
from visionr1_trainer.data.formats import read_bridge_source, read_cold, read_rl, write_rows
from visionr1_trainer.data.sources import DataSourceError
from visionr1_trainer.eval.benchmarks import load_benchmark
from visionr1_trainer.eval.scoring import score, summarize


def png_bytes(color=(10, 20, 30), size=8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_file(path: Path, color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def inline(color=(10, 20, 30), name="x.png") -> dict:
    """An image as the hub's parquet stores one (the datasets Image feature)."""
    return {"bytes": png_bytes(color), "path": name}


def bench(fmt: str, source, **data) -> BenchmarkSpec:
    return BenchmarkSpec.model_validate({"name": fmt.replace("_", "-"), "format": fmt,
                                         "data": {"source": str(source), **data}})


def readme(directory: Path, configs: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text(f"---\nlicense: mit\nconfigs:\n{configs}---\n# card\n")


def answer(text: str) -> str:
    return f"<think>working</think><answer> Final Answer:{text} </answer>"


# --- MathVerse: testmini.parquet beside testmini.json, testmini_text_only beside it -------------


def mathverse_row(i: int, version: str, image=True) -> dict:
    return {"sample_index": str(i), "problem_index": str(i), "problem_version": version,
            "question": f"Question {i}\nChoices:\nA:1\nB:2", "image": inline() if image else None,
            "answer": "B", "question_type": "multi-choice", "metadata": {"subject": "plane geometry"},
            "query_wo": f"q{i}", "query_cot": f"Question {i}\nChoices:\nA:1\nB:2", "question_for_eval": f"q{i}"}


@pytest.fixture
def mathverse(tmp_path) -> Path:
    root = tmp_path / "MathVerse"
    vision = [mathverse_row(1, "Vision Intensive"), mathverse_row(2, "Vision Only"), mathverse_row(3, "Text Lite")]
    text_only = [mathverse_row(4, "Text Only", image=False), mathverse_row(5, "Text Only", image=False)]
    write_rows(vision, root / "testmini.parquet")
    write_rows(text_only, root / "testmini_text_only.parquet")
    # the JSON copies name their images by path, inside images.zip
    write_rows([{**r, "image": f"images/{r['sample_index']}.png"} for r in vision], root / "testmini.json")
    write_rows([{**r, "image": ""} for r in text_only], root / "testmini_text_only.json")
    with zipfile.ZipFile(root / "images.zip", "w") as z:
        for r in vision:
            z.writestr(f"images/{r['sample_index']}.png", png_bytes())
    return root


def test_mathverse_mirror_reads_each_row_once_and_honours_the_subset(mathverse):
    result = load_benchmark(bench("mathverse", mathverse))  # the default: subset testmini, split testmini
    assert sorted(it.id for it in result.items) == ["1", "2", "3"] and result.rows_read == 3
    text_only = load_benchmark(bench("mathverse", mathverse, subset="testmini_text_only",
                                     split="testmini_text_only"))
    assert sorted(it.id for it in text_only.items) == ["4", "5"]
    assert not text_only.items[0].image_paths


def test_mathverse_readme_configs_decide_like_the_hub(mathverse):
    readme(mathverse, "- config_name: testmini\n  data_files:\n  - split: testmini\n    path: testmini.parquet\n"
                      "- config_name: testmini_text_only\n  data_files:\n  - split: testmini_text_only\n"
                      "    path: testmini_text_only.parquet\n")
    assert load_benchmark(bench("mathverse", mathverse)).rows_read == 3
    with pytest.raises(DataSourceError, match=r"subset 'testmini_vision' is not a config .*testmini_text_only"):
        load_benchmark(bench("mathverse", mathverse, subset="testmini_vision", split="testmini"))


def test_mathverse_json_copy_alone_finds_its_images_in_images_zip(mathverse):
    (mathverse / "testmini.parquet").unlink()
    result = load_benchmark(bench("mathverse", mathverse))
    assert len(result.items) == 3 and not result.skipped
    assert all(Path(it.image_paths[0]).is_file() for it in result.items)


def test_a_split_or_subset_that_names_no_file_is_an_error_naming_the_files(mathverse):
    with pytest.raises(DataSourceError, match=r"split 'test' matches no file .*testmini\.parquet"):
        load_benchmark(bench("mathverse", mathverse, subset="testmini", split="test"))
    with pytest.raises(DataSourceError, match=r"subset 'nope' matches no file .*testmini_text_only\.json"):
        load_benchmark(bench("mathverse", mathverse, subset="nope", split="testmini"))
    with pytest.raises(DataSourceError, match="subset 'other' does not name the file testmini.parquet"):
        load_benchmark(bench("mathverse", mathverse / "testmini.parquet", subset="other"))


def test_subset_is_honoured_for_an_s3_mirror(mathverse, tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="mirror")
        for path in mathverse.iterdir():
            s3.upload_file(str(path), "mirror", f"MathVerse/{path.name}")
        spec = bench("mathverse", "s3://mirror/MathVerse", subset="testmini_text_only", split="testmini_text_only")
        result = load_benchmark(spec, cache_dir=tmp_path / "cache")
    assert sorted(it.id for it in result.items) == ["4", "5"] and result.rows_read == 2


# --- DynaMath: ten sample_variant splits stored as data/sample<N>-*.parquet ----------------------


def dynamath_repo(root: Path, with_readme: bool) -> Path:
    for n in range(1, 11):
        rows = [
            {"id": "1", "question": "What is the area?", "image": f"images/1_{n}.png", "decoded_image": inline(),
             "ground_truth": "3.142", "answer_type": "float", "subject": "PG", "knowledge_level": "high school"},
            {"id": "2", "question": "Which?\nChoices:\n(A) sin x\n(B) cos x", "image": f"images/2_{n}.png",
             "decoded_image": inline(), "ground_truth": "B", "answer_type": "multiple choice", "subject": "AL",
             "knowledge_level": "undergraduate"},
        ]
        write_rows(rows, root / "data" / f"sample{n}-00000-of-00001.parquet")
    if with_readme:
        readme(root, "- config_name: default\n  data_files:\n" + "".join(
            f"  - split: sample_variant{n}\n    path: data/sample{n}-*\n" for n in range(1, 11)))
    return root


@pytest.mark.parametrize("with_readme", [True, False])
def test_dynamath_reads_all_ten_variants_and_scores_the_worst_case(tmp_path, with_readme):
    root = dynamath_repo(tmp_path / "DynaMath_Sample", with_readme)
    items = load_benchmark(bench("dynamath", root)).items
    assert len(items) == 20 and len({it.id for it in items}) == 20
    assert {it.id for it in items if it.group == "1"} == {f"1-v{n}" for n in range(1, 11)}
    # question 1 right on nine variants of ten, question 2 on all ten
    records = [{"correct": score(it, answer("3.1416" if it.id != "1-v7" else "3.2") if it.group == "1"
                                 else answer("B")).correct, "judged": None, "format_ok": True,
                "extracted": "x", "tokens": 1, "attempts": 1, "group": it.group, "categories": it.categories}
               for it in items]
    summary = summarize(records)
    assert summary["accuracy"] == 0.95 and summary["worstCaseAccuracy"] == 0.5 and summary["questions"] == 2
    one = load_benchmark(bench("dynamath", root, split="sample_variant3")).items
    assert sorted(it.id for it in one) == ["1-v3", "2-v3"]
    with pytest.raises(DataSourceError, match="split 'test'"):
        load_benchmark(bench("dynamath", root, split="test"))


def test_dynamath_hub_name_loads_every_variant_split(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None, **kw):
        calls.append((name, subset, split))
        return [{"id": "7", "question": "q", "decoded_image": inline(), "ground_truth": "yes",
                 "answer_type": "free form", "subject": "GT", "knowledge_level": "high school"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = load_benchmark(bench("dynamath", "DynaMath/DynaMath_Sample")).items
    assert [c[2] for c in calls] == [f"sample_variant{n}" for n in range(1, 11)]
    assert [it.id for it in items] == [f"7-v{n}" for n in range(1, 11)]


# --- MM-Math: MM_Math/MM_Math.jsonl with its images in MM_Math/MM_Math.zip ----------------------


def mmmath_rows() -> list[dict]:
    return [
        {"question": "Find x and y.", "file_name": "1.png", "year": "八年级上学期", "difficult": "普通",
         "knowledge": "Properties of Shapes", "solution": "So $x=\\boxed{3}$ and $y=\\boxed{4}$."},
        {"question": "Find the area.", "file_name": "2.png", "year": "九年级下学期", "difficult": "困难",
         "knowledge": "Functions", "solution": "The area is \\boxed{\\frac{1}{2}}."},
    ]


@pytest.mark.parametrize("images", ["zip", "extracted"])
def test_mmmath_layout_reads_images_beside_the_jsonl(tmp_path, images):
    folder = tmp_path / "repo" / "MM_Math"
    write_rows(mmmath_rows(), folder / "MM_Math.jsonl")
    if images == "zip":
        with zipfile.ZipFile(folder / "MM_Math.zip", "w") as z:
            z.writestr("MM_Math/1.png", png_bytes())
            z.writestr("MM_Math/2.png", png_bytes((1, 2, 3)))
    else:
        png_file(folder / "1.png")
        png_file(folder / "2.png", (1, 2, 3))
    result = load_benchmark(bench("mmmath", tmp_path / "repo"))  # the repo's root, as mirrored
    assert len(result.items) == 2 and not result.skipped
    first, second = result.items
    assert first.answer_parts == ["3", "4"] and second.answer_parts == ["\\frac{1}{2}"]
    assert second.load_images()[0].getpixel((0, 0)) == (1, 2, 3)
    assert score(first, answer("\\boxed{3}, \\boxed{4}")).correct
    assert not score(first, answer("\\boxed{4}")).correct  # the last box alone is not the answer
    assert score(second, answer("\\boxed{0.5}")).correct


def test_mmmath_hub_name_is_read_as_the_repo_files(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "snapshot"
    write_rows(mmmath_rows(), repo / "MM_Math" / "MM_Math.jsonl")
    with zipfile.ZipFile(repo / "MM_Math" / "MM_Math.zip", "w") as z:
        z.writestr("1.png", png_bytes())
        z.writestr("2.png", png_bytes())
    # a card whose configs list the image folder's pictures (the hub's image-folder view)
    readme(repo, "- config_name: default\n  data_files:\n  - split: train\n    path: MM_Math/*.png\n")
    seen = {}

    def fake_snapshot(repo_id, repo_type=None, allow_patterns=None, cache_dir=None, **kw):
        seen.update(repo_id=repo_id, repo_type=repo_type, patterns=allow_patterns)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    result = load_benchmark(bench("mmmath", "THU-KEG/MM_Math"), cache_dir=tmp_path / "cache")
    assert seen["repo_id"] == "THU-KEG/MM_Math" and seen["repo_type"] == "dataset" and "*.zip" in seen["patterns"]
    assert len(result.items) == 2 and not result.skipped


# --- Vision-R1-cold: two JSON arrays, images from the LLaVA-CoT and Mulberry folders --------------


def vision_r1_cold(root: Path) -> None:
    llava = [{"id": "llava-1", "image": "coco/train2017/1.jpg",
              "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                {"from": "gpt", "value": "<think>a cat</think><answer> Final Answer:cat </answer>"}]}]
    mulberry = [{"images": ["AI2D/2.png"],
                 "conversations": [{"from": "user", "value": "<image>How many?"},
                                   {"from": "assistant", "value": "<think>2</think><answer> Final Answer:2 </answer>"}]}]
    write_rows(llava, root / "vision_r1_llava_cot_full.json")
    write_rows(mulberry, root / "vision_r1_mulberry_sft_full.json")
    (root / "dataset_info.json").write_text(json.dumps({
        "vision_r1_llava_cot_full": {"file_name": "vision_r1_llava_cot_full.json", "formatting": "sharegpt",
                                     "columns": {"messages": "conversations", "images": "image"}},
        "vision_r1_mulberry_sft_full": {"file_name": "vision_r1_mulberry_sft_full.json", "formatting": "sharegpt",
                                        "columns": {"messages": "conversations", "images": "images"}}}))
    (root / "README.md").write_text("---\nlicense: cc-by-nc-sa-4.0\n---\n")


def test_vision_r1_cold_as_published_with_configured_image_folders(tmp_path):
    root = tmp_path / "vision_r1_cold"
    vision_r1_cold(root)
    png_file(root / "llava_cot_images" / "coco" / "train2017" / "1.jpg")  # Vision-R1's README layout
    png_file(root / "mulberry_images" / "AI2D" / "2.png")
    (root / "llava_cot_images" / "coco" / "annotations.json").write_text("[{\"not\": \"a row\"}]")
    ref = DatasetRef.model_validate({"source": str(root), "imageRoots": [
        str(root / "llava_cot_images"), f"file://{root / 'mulberry_images'}"]})
    result = read_cold(ref)
    assert result.rows_read == 2 and not result.skipped  # dataset_info.json is not rows
    by_q = {ex.question: ex for ex in result.items}
    assert set(by_q) == {"What is shown?", "How many?"}
    assert by_q["How many?"].response.endswith("Final Answer:2 </answer>") and by_q["How many?"].image_paths


def test_vision_r1_cold_hub_name_reads_both_files(tmp_path, monkeypatch):
    import huggingface_hub

    root = tmp_path / "snapshot"
    vision_r1_cold(root)
    png_file(tmp_path / "images" / "coco" / "train2017" / "1.jpg")
    png_file(tmp_path / "images" / "AI2D" / "2.png")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: str(root))
    ref = DatasetRef.model_validate({"source": "Osilly/Vision-R1-cold", "imageRoots": [str(tmp_path / "images")]})
    result = read_cold(ref, cache_dir=tmp_path / "cache")
    assert len(result.items) == 2 and not result.skipped


def test_missing_cold_images_are_counted_not_hidden(tmp_path):
    root = tmp_path / "vision_r1_cold"
    vision_r1_cold(root)
    result = read_cold(DatasetRef.model_validate({"source": str(root)}))
    assert result.items == [] and dict(result.skipped) == {"missing_image": 2}


# --- conversation-only bridge sources: LLaVA-CoT-100k and Mulberry-SFT -----------------------------


def test_conversation_field_map_reads_llava_cot_and_mulberry_rows(tmp_path):
    png_file(tmp_path / "chartqa" / "1.png")
    png_file(tmp_path / "mulberry" / "2.png")
    llava = [{"id": "c1", "image": "chartqa/1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is the peak?"},
        {"from": "gpt", "value": "<SUMMARY>s</SUMMARY><CONCLUSION>42</CONCLUSION>"},
        {"from": "human", "value": "And the lowest?"}, {"from": "gpt", "value": "<CONCLUSION>7</CONCLUSION>"}]}]
    write_rows(llava, tmp_path / "train.jsonl")
    result = read_bridge_source(DatasetRef.model_validate({"source": str(tmp_path / "train.jsonl"),
                                                           "conversation": {}}))
    (ex,) = result.items
    assert (ex.id, ex.question, ex.answer) == ("c1", "What is the peak?", "<CONCLUSION>7</CONCLUSION>")
    mulberry = [{"messages": [{"role": "user", "content": "<image>How many bars?"},
                              {"role": "assistant", "content": "### The final answer is: 3"}],
                 "images": ["mulberry/2.png"]}]
    write_rows(mulberry, tmp_path / "mulberry.json")
    ref = DatasetRef.model_validate({"source": str(tmp_path / "mulberry.json"),
                                     "conversation": {"field": "messages", "images": "images"}})
    (ex,) = read_bridge_source(ref).items
    assert (ex.question, ex.answer) == ("How many bars?", "### The final answer is: 3") and ex.image_paths


# --- what loads correctly today stays so ------------------------------------------------------------


def test_vision_r1_rl_and_geometry3k_layouts(tmp_path):
    rl = [{"id": 7, "images": [inline()], "problem": "<image>Find x.", "answer": "3"}]
    write_rows(rl, tmp_path / "Vision-R1-rl" / "train.parquet")
    (item,) = read_rl(DatasetRef.model_validate({"source": str(tmp_path / "Vision-R1-rl")})).items
    assert item.id == "7" and item.answer == "3" and len(item.image_paths) == 1
    geo = tmp_path / "geometry3k" / "data"
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        write_rows([{"images": [inline()], "problem": f"<image>{split} {i}", "answer": str(i)} for i in range(n)],
                   geo / f"{split}-00000-of-00001.parquet")
    assert len(read_rl(DatasetRef.model_validate({"source": str(geo.parent)})).items) == 3
    assert len(read_rl(DatasetRef.model_validate({"source": str(geo.parent), "split": "test"})).items) == 1


def test_mathvista_testmini_hub_layout(tmp_path):
    root = tmp_path / "MathVista"
    row = {"pid": "1", "question": "Find x.", "image": "images/1.jpg", "decoded_image": inline(),
           "choices": ["145°", "165°"], "unit": None, "precision": None, "answer": "165°",
           "question_type": "multi_choice", "answer_type": "text", "query": "Question: Find x.",
           "metadata": {"task": "geometry problem solving", "skills": ["geometry reasoning"]}}
    float_row = {**row, "pid": "2", "choices": None, "answer": "1.2", "precision": 1.0,
                 "question_type": "free_form", "answer_type": "float"}
    write_rows([row, float_row], root / "data" / "testmini-00000-of-00001-abc.parquet")
    write_rows([{**row, "pid": "t1", "answer": ""}], root / "data" / "test-00000-of-00002-def.parquet")
    write_rows([{**row, "decoded_image": None}], root / "annot_testmini.json")  # not rows of a split
    readme(root, "- config_name: default\n  data_files:\n  - split: testmini\n    path: data/testmini-*\n"
                 "  - split: test\n    path: data/test-*\n")
    items = {it.id: it for it in load_benchmark(bench("mathvista", root)).items}
    assert sorted(items) == ["1", "2"] and items["1"].answer == "B" and items["2"].precision == 1
    assert items["1"].categories == {"task": ["GPS"], "skill": ["GEO"]}


def test_mathvista_github_layout_rows_keyed_by_pid(tmp_path):
    """MathVista's own data/ folder: testmini.json is an object keyed by pid, beside query.json,
    test.json and images/ (from images.zip)."""
    data = tmp_path / "data"
    png_file(data / "images" / "1.jpg")
    problems = {"1": {"pid": "1", "question": "How many?", "image": "images/1.jpg", "choices": None, "unit": None,
                      "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer",
                      "metadata": {"task": "figure question answering", "skills": ["arithmetic reasoning"]},
                      "query": "Question: How many?"}}
    (data / "testmini.json").write_text(json.dumps(problems, indent=4))
    (data / "test.json").write_text(json.dumps({"9": {**problems["1"], "pid": "9", "answer": ""}}, indent=4))
    (data / "query.json").write_text(json.dumps({"1": "Question: How many?"}, indent=4))
    (item,) = load_benchmark(bench("mathvista", data)).items
    assert item.id == "1" and item.answer == "3" and item.image_paths
