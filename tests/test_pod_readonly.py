"""Stage pods run with a read-only root filesystem: every write goes to /scratch or /tmp.

Two halves. The Jobs of every example are rendered and checked: readOnlyRootFilesystem,
a memory-backed /tmp, a /scratch emptyDir whose sizeLimit is the pod's ephemeral-storage
request, and every cache variable pointing under one of the two. Then a real CPU stage (the
tiny SFT) runs with the same variables, /scratch and /tmp remapped to test folders, HOME
and the working directory read-only, under strace: every file the stage and its libraries
(torch, transformers, datasets, the hub client, matplotlib...) create, open for writing,
rename, link or remove must lie under /scratch, /tmp, the stage's output or /dev. On this
machine the tests run as root, which a chmod does not stop, so strace is what sees a write.
What it cannot see: the GPU-only writers (vLLM, Triton, inductor, FlashInfer, DeepSpeed's
JIT), which CPU runs never load; their variables are checked by name against their
libraries' documented settings, and the GPU job of .github/workflows/images.yml runs them
under --read-only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visionr1_operator.cluster import jobs, naming, pods
from visionr1_operator.manifest import load_run
from visionr1_operator.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
WRITABLE = (naming.SCRATCH_DIR, naming.TMP_DIR, "/dev/shm")


def every_job():
    for path in EXAMPLES:
        run = load_run(path)
        for plan in build_plan(run):
            yield f"{path.name}:{plan.name}", plan, jobs.build_job(
                naming.Owner(run.name, run.namespace, "uid"), run.spec, plan, 1, suspend=False)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_stage_pod_of_every_example_has_a_read_only_root(path):
    for where, plan, job in every_job():
        if not where.startswith(path.name):
            continue
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes["tmp"]["emptyDir"] == {"medium": "Memory", "sizeLimit": naming.TMP_SIZE}, where
        assert mounts[naming.TMP_DIR]["name"] == "tmp" and mounts[naming.SCRATCH_DIR]["name"] == "scratch"
        scratch = volumes["scratch"]["emptyDir"]
        assert scratch.get("medium", "") == "" and "sizeLimit" in scratch, where  # on the node's disk
        assert container["resources"]["requests"]["ephemeral-storage"] == scratch["sizeLimit"], where
        # Writable: /scratch, /tmp, /dev/shm, the PVCs; the config is mounted read-only.
        for mount_path, mount in mounts.items():
            if not mount.get("readOnly"):
                assert mount_path in WRITABLE or mount_path.startswith(naming.PVC_ROOT + "/"), (where, mount_path)
        assert mounts[naming.CONFIG_DIR]["readOnly"] is True
        env = {e["name"]: e.get("value") for e in container["env"]}
        for name, value in pods.cache_env().items():
            assert env[name] == value, (where, name)
            assert value == naming.TMP_DIR or value.startswith(tuple(d + "/" for d in WRITABLE)) or value == "1", (
                where, name, value)


def test_scratch_is_sized_from_the_stage():
    sized = {where: job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"]
             for where, _, job in every_job()}
    # The paper's 7B: a GRPO stage keeps the download, a saved model and the optimizer state
    # (12 bytes a parameter on one node): 14 + 14 + 84 GB = 105 GiB, + 20Gi of caches.
    assert sized["vision-r1-7b.yaml:ptst-1"] == "125Gi"
    assert sized["vision-r1-7b.yaml:eval"] == "34Gi"  # the download and the caches
    assert pods.model_params("Qwen/Qwen2.5-VL-72B-Instruct") == 72.0
    assert pods.model_params("Qwen/Qwen2.5-VL-7B-Instruct") == 7.0
    assert pods.model_params("s3://bucket/models/sft-final") is None
    assert pods.model_params("org/model-1.5b") == 1.5


def test_scratch_size_is_the_users_when_given():
    run = load_run(EXAMPLES[[p.name for p in EXAMPLES].index("vision-r1-7b.yaml")])
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["stages"]["eval"]["resources"]["scratchSize"] = "1Ti"
    from visionr1_operator.api import VisionR1Run
    from visionr1_trainer.config import WIRE

    run = VisionR1Run.model_validate(doc, **WIRE)
    (plan,) = [p for p in build_plan(run) if p.name == "eval"]
    job = jobs.build_job(naming.Owner(run.name, run.namespace, "u"), run.spec, plan, 1, suspend=False)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "1Ti"
    assert {v["name"]: v for v in pod["volumes"]}["scratch"]["emptyDir"]["sizeLimit"] == "1Ti"


def test_the_variables_are_the_ones_each_library_reads():
    # Each name as its library spells it (a typo would silently leave that cache in HOME).
    import matplotlib  # noqa: F401  (MPLCONFIGDIR: matplotlib.get_configdir)
    import torch.utils.cpp_extension as ext

    env = pods.cache_env()
    assert "TORCH_EXTENSIONS_DIR" in Path(ext.__file__).read_text()  # DeepSpeed's JIT ops build here
    import torch._inductor.runtime.cache_dir_utils as inductor

    assert "TORCHINDUCTOR_CACHE_DIR" in Path(inductor.__file__).read_text()
    import huggingface_hub.constants as hub

    assert "HF_HOME" in Path(hub.__file__).read_text()
    import matplotlib as mpl

    assert "MPLCONFIGDIR" in Path(mpl.__file__).read_text()
    # vLLM, Triton, FlashInfer and numba are not installed on CPU machines: their names are
    # the ones their docs give (VLLM_CACHE_ROOT, VLLM_CONFIG_ROOT, TRITON_HOME, TRITON_CACHE_DIR,
    # FLASHINFER_WORKSPACE_BASE, NUMBA_CACHE_DIR; CUDA_CACHE_PATH is the driver's).
    assert {"VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "TRITON_HOME", "TRITON_CACHE_DIR",
            "FLASHINFER_WORKSPACE_BASE", "NUMBA_CACHE_DIR", "CUDA_CACHE_PATH"} <= set(env)


# --- a real stage under a read-only root ------------------------------------------------------

WRITE_CALLS = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,symlink,symlinkat,link,linkat,truncate"
_CALL = re.compile(r'^\d+\s+(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?)(?P<err>\s+\w+)?')


def written_paths(trace: str, cwd: Path) -> list[tuple[str, str, str]]:
    """(call, absolute path, result) of every write-like call strace recorded."""
    out = []
    for line in trace.splitlines():
        found = _CALL.match(line)
        if not found:
            continue
        call, args, ret, err = found["call"], found["args"], found["ret"], (found["err"] or "").strip()
        paths = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        if not paths:
            continue
        # *at calls: a relative path is relative to the descriptor strace -y names, <path>.
        dirs = re.findall(r'(?:AT_FDCWD|\d+)(?:<([^>]*)>)?, "', args)
        if call in ("openat", "open"):
            flags = args.split(", ")[2 if call == "openat" else 1] if args.count(", ") >= (2 if call == "openat" else 1) else ""
            if not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", flags):
                continue
            paths = paths[:1]
        if call in ("mkdir", "mkdirat") and err == "EEXIST":
            continue  # makedirs(exist_ok=True) on a folder that is there: nothing written
        for i, p in enumerate(paths[:2] if call.startswith(("rename", "link", "symlink")) else paths[:1]):
            if call.startswith("symlink") and i == 0:
                continue  # the link's target is not written
            base = dirs[i] if call.endswith(("at", "at2")) and i < len(dirs) else ""
            if call.startswith("symlinkat"):
                base = dirs[0] if dirs else ""
            absolute = p if p.startswith("/") else str(Path(base) / p if base else cwd / p)
            out.append((call, os.path.normpath(absolute), err or ret))
    return out


@pytest.fixture(scope="module")
def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is needed to see where a stage writes (make tools-build installs it)")
        pytest.skip("!!! strace not found: the read-only stage run is NOT checked !!!")
    return found


@pytest.mark.slow
def test_a_cpu_stage_with_the_pod_variables_and_a_read_only_home_writes_nowhere_else(strace, tmp_path):
    from visionr1_trainer.config import SFTStageConfig
    from visionr1_trainer.data.synthetic import generate, tokenizer_corpus
    from visionr1_trainer.models.tiny import build_tiny_vlm

    inputs = tmp_path / "inputs"
    model = build_tiny_vlm(inputs / "model", corpus=tokenizer_corpus(per_task=2))
    data = generate(inputs / "synthetic", 8, seed=3, n_eval=1)
    out = tmp_path / "storage" / "run" / "sft"
    config = SFTStageConfig.model_validate({
        "run": "ro", "stage": "sft", "outputUri": f"file://{out}", "storage": {"uri": f"file://{out.parent}"},
        "model": {"name": f"file://{model}", "dtype": "float32"}, "metricsPort": 0,
        "data": {"source": str(data.cold_start)},
        "sft": {"epochs": 1, "learningRate": 1e-3, "cutoffLength": 256, "perDeviceBatchSize": 4,
                "gradientAccumulationSteps": 1, "precision": "fp32", "deepspeedZeroStage": 0, "saveEverySteps": 1},
    })
    config_file = inputs / "stage.json"
    config_file.write_text(json.dumps(config.to_json_dict()))
    scratch, tmp, home, cwd = (tmp_path / n for n in ("scratch", "tmp", "home", "cwd"))
    for d in (scratch, tmp, home, cwd):
        d.mkdir()
    (home / ".keep").write_text("")
    home.chmod(0o555)
    cwd.chmod(0o555)
    env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
        **pods.cache_env(str(scratch), str(tmp)),
        "VISIONR1_WORK_DIR": f"{scratch}/work", "VISIONR1_CACHE_DIR": f"{scratch}/cache",
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    trace = tmp_path / "trace.txt"
    run = subprocess.run(
        [strace, "-f", "-qq", "-y", "-s", "4096", "-e", f"trace={WRITE_CALLS}", "-o", str(trace),
         sys.executable, "-m", "visionr1_trainer", "sft", "--config", str(config_file)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (out / "model").is_dir(), "the stage committed no model"
    allowed = (str(scratch), str(tmp), str(tmp_path / "storage"), "/dev/")
    writes = written_paths(trace.read_text(), cwd)
    assert writes, "strace recorded no write at all: the check is blind"
    elsewhere = sorted({(c, p, r) for c, p, r in writes if not p.startswith(allowed) and p != "/dev/null"})
    assert not elsewhere, "\n".join(f"{c} {p} -> {r}" for c, p, r in elsewhere[:40])
    assert sorted(p.name for p in home.iterdir()) == [".keep"] and list(cwd.iterdir()) == []
    # And the caches did land where the variables point.
    assert any(p.startswith(str(scratch)) for _, p, _ in writes)
