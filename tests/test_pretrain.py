"""The demo's base model pretraining (visionr1_trainer.pretrain): on its own split, fixed
settings kept beside the weights, the same seed the same weights, reused when unchanged."""

from __future__ import annotations

import json

import pytest

from visionr1_trainer import pretrain
from visionr1_trainer.data.synthetic import make_sample

SMALL = {"samples": 8, "steps": 3, "batch_size": 4, "check_samples": 4}


def test_texts_name_the_scene_and_its_answer():
    s = make_sample("largest", 0, "pretrain", 0)
    big, small = s.scene["large"], s.scene["small"]
    assert pretrain.caption(s.scene) == f"A large {big['color']} {big['shape']} and a small {small['color']} {small['shape']}."
    assert pretrain.direct_answer(s.scene, s.answer).endswith(f"The answer is ({s.answer}).")
    assert "<think>" not in pretrain.direct_answer(s.scene, s.answer)  # no reasoning: that is SFT's to teach
    # its own split: never an image of the training, RL or eval sets
    assert s.id.startswith("pretrain-") and make_sample("largest", 0, "train", 0).id != s.id


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown pretraining setting.*stepz"):
        pretrain.settings(0, {"stepz": 3})


@pytest.mark.timeout(300)
def test_same_seed_same_weights_and_reuse(tmp_path):
    from safetensors.torch import load_file

    from visionr1_trainer.demo import prepare

    weights = []
    for name in ("a", "b"):
        inputs = prepare(tmp_path / name, n=8, seed=1, n_eval=8, pretraining=SMALL, log=lambda *_: None)
        info = json.loads((inputs / "base-model" / pretrain.INFO).read_text())
        assert info["settings"] == {**pretrain.PRETRAIN, **SMALL, "seed": 1}
        assert 0 <= info["perception"] <= 1
        weights.append(load_file(str(inputs / "base-model" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
    model = tmp_path / "a" / "base-model" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    prepare(tmp_path / "a", n=8, seed=1, n_eval=8, pretraining=SMALL, log=lambda *_: None)
    assert model.stat().st_mtime_ns == stamp  # the same settings: reused
    assert pretrain.is_pretrained(tmp_path / "a" / "base-model", 1, SMALL)
    assert not pretrain.is_pretrained(tmp_path / "a" / "base-model", 1, {**SMALL, "steps": 4})
    prepare(tmp_path / "a", n=8, seed=1, n_eval=8, pretraining={**SMALL, "steps": 4}, log=lambda *_: None)
    assert json.loads((tmp_path / "a" / "base-model" / pretrain.INFO).read_text())["settings"]["steps"] == 4
