"""Packaging rules: two import packages, no `operator` package, operator side without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_operator_is_the_standard_library_module_even_from_the_repo_root():
    # cwd = repo root puts operator/ on sys.path as a possible namespace package.
    out = run_python("import operator, sys; print(operator.__file__); print(operator.add(2, 3))")
    path, total = out.split()
    assert Path(path).parent.name.startswith("python3") and total == "5"
    assert not (ROOT / "operator" / "__init__.py").exists()
    assert not (ROOT / "trainer_image" / "__init__.py").exists()


def test_control_plane_imports_without_torch_or_kopf_at_import_time():
    out = run_python(
        "import sys\n"
        "import visionr1_operator.cli, visionr1_operator.plan, visionr1_operator.crd\n"
        "import visionr1_trainer.config\n"
        "print(sorted(m for m in ('torch', 'transformers', 'boto3') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_trainer_config_never_imports_kopf():
    out = run_python(
        "import sys, visionr1_trainer.config\n"
        "print('kopf' in sys.modules, 'kubernetes' in sys.modules)\n"
    )
    assert out.strip() == "False False"


def test_constraints_pin_every_direct_dependency():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    deps = list(pyproject["project"]["dependencies"])
    for extra, items in pyproject["project"]["optional-dependencies"].items():
        if extra != "gpu":  # the trainer image pins its own CUDA stack
            deps += items
    for dep in deps:
        name = dep.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        # An exact pin in pyproject itself also pins it: the bench extra's torchvision (0.28.0,
        # for our torch 2.13), which constraints.txt cannot hold (its pins equal the GPU
        # lock's, where vLLM's torch takes torchvision 0.29).
        exact = "==" in dep and not any(op in dep for op in ("*", ",", ">", "<", "~", "!"))
        assert name in pins or exact, f"{name} (from pyproject) is not pinned in constraints.txt"
    # The known resolver trap: kubernetes 37 needs python-dateutil>=3, botocore <3.
    assert pins["kubernetes"].startswith("36.")
