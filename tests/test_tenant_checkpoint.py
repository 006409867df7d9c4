"""A planted checkpoint must not run code on resume (issue: multi-tenant safety, finding 3).

Whoever can write the artifact store could replace ``trainer_state.pt``; the next resume
loads it with the hub token, storage keys and API keys in the environment. The state is
read with ``torch.load(weights_only=True)``: a pickle that calls a function is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from visionr1_trainer import checkpoint


class _Plant:
    """Unpickling this calls ``Path.touch(marker)``: code execution, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_trainer_state_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    state = tmp_path / checkpoint.STATE_FILE
    torch.save({"step": 3, "rng": _Plant(marker), "optimizer": None}, state)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_trainer_state(tmp_path, optimizer=None)
    assert not marker.exists(), "loading the checkpoint ran the planted code"


class _Model(torch.nn.Linear):
    def save_pretrained(self, directory, state_dict=None):  # the weights are not under test here
        Path(directory).mkdir(parents=True, exist_ok=True)


def test_an_honest_trainer_state_still_loads(tmp_path):
    model = _Model(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpoint.save_training_state(tmp_path, model, optimizer, None, step=5, extra={"note": "ok"})
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, extra = checkpoint.load_trainer_state(tmp_path, fresh)
    assert step == 5 and extra == {"note": "ok"}
    assert fresh.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
