# One entry point for a fresh machine: `make demo` and `make test` create .venv and
# install the pinned dependencies (constraints.txt) on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP_VERSION := 26.3
EXTRAS ?= operator,train,test
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: help install demo test test-fast cluster cluster-build gpu-smoke bench-grpo crd images clean

help:
	@echo "make demo       run the tiny CPU example end to end on this machine"
	@echo "make test       run the whole test suite (CPU, no downloads; builds the test control plane)"
	@echo "make cluster    start the test control plane in the foreground (Ctrl-C stops it)"
	@echo "make gpu-smoke  run the tests marked gpu (needs a CUDA accelerator)"
	@echo "make bench-grpo GRPO throughput against TRL (see BENCHMARKS.md)"
	@echo "make crd        regenerate the CRD (crds/ and the chart's crds/) from the pydantic API"
	@echo "make images     build the operator and trainer images (needs Docker with BuildKit)"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	# DeepSpeed for the ZeRO tests on CPU ranks (gloo): its build imports torch, so it
	# comes after the main install, with no ops compiled ahead of time.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation -c constraints.txt \
		hjson py-cpuinfo msgpack einops ninja deepspeed==0.19.8
	@rm -f $(VENV)/.installed-*
	@touch $@

# The whole pipeline on a tiny model on CPU: builds the inputs (tiny Qwen2.5-VL,
# synthetic images), runs examples/tiny-cpu.yaml stage by stage, writes the report.
demo: install
	$(BIN)/visionr1 validate examples/tiny-cpu.yaml
	$(BIN)/visionr1 demo

# By file: a file's tests stay on one worker and share their module fixtures (one
# torchrun for the DeepSpeed jobs, one CRD install). The control plane's binaries are
# built before pytest starts (a cold build takes minutes; no test timeout counts it).
test: install cluster-build
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The test control plane (tests/cluster/): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok, built from pinned Go modules into ~/.cache/visionr1/cluster.
# Without Go: one loud line, and the cluster tests skip (CI sets VISIONR1_REQUIRE_CLUSTER=1
# and fails instead).
cluster-build: install
	@if command -v go >/dev/null; then $(BIN)/python tests/cluster/gobuild.py; \
	elif [ "$$VISIONR1_REQUIRE_CLUSTER" = 1 ]; then echo "error: Go is required to build the test control plane" >&2; exit 1; \
	else echo "!!! Go not found: the tests on the real control plane will be SKIPPED !!!" >&2; fi

# CLUSTER_DIR (default .cluster) holds kubeconfig and logs/; CLUSTER_NODES fake GPU nodes (default 4).
cluster: cluster-build
	$(BIN)/python tests/cluster/controlplane.py

test-fast: install
	$(BIN)/python -m pytest -x -q -m "not gpu and not slow"

# On a GPU machine: add vLLM and DeepSpeed. vLLM pins its own CUDA torch, so the CPU torch
# line of constraints.txt gives way; every other pin holds (as in trainer_image/Dockerfile).
gpu-smoke: install
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints-gpu.txt -e ".[$(EXTRAS),gpu]"
	$(BIN)/python -m pytest -m gpu -v

# GRPO step time and tokens/s against TRL's GRPOTrainer (results in BENCHMARKS.md).
bench-grpo: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/grpo_vs_trl.py --steps 8
	$(BIN)/python bench/grpo_vs_trl.py --steps 6 --hidden 256 --layers 4 --max-len 128 --out bench/results/grpo_vs_trl_h256.json

# The CRD lives twice: crds/ for kubectl, the chart's crds/ for Helm (a test checks both).
crd: install
	$(BIN)/visionr1 crd > crds/visionr1run.yaml
	cp crds/visionr1run.yaml charts/visionr1-operator/crds/visionr1run.yaml

# Tags from the chart's appVersion, as the chart expects them.
APP_VERSION = $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/visionr1-operator/Chart.yaml)
images:
	docker build -t visionr1/operator:$(APP_VERSION) .
	docker build -f trainer_image/Dockerfile -t visionr1/trainer:$(APP_VERSION) .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cluster
