# One entry point for a fresh machine: `make demo` and `make test` create .venv and
# install the pinned dependencies (constraints.txt) on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP_VERSION := 26.3
EXTRAS ?= operator,train,test
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: help install demo test test-fast cluster cluster-build gpu-smoke bench-grpo crd images gpu-lock tools-build clean

help:
	@echo "make demo       run the tiny CPU example end to end on this machine"
	@echo "make test       run the whole test suite (CPU, no downloads; builds the test control plane)"
	@echo "make cluster    start the test control plane in the foreground (Ctrl-C stops it)"
	@echo "make gpu-smoke  run the tests marked gpu (needs a CUDA accelerator)"
	@echo "make bench-grpo GRPO throughput against TRL (see BENCHMARKS.md)"
	@echo "make crd        regenerate the CRD (crds/ and the chart's crds/) from the pydantic API"
	@echo "make images     build the operator and trainer images (needs Docker with BuildKit)"
	@echo "make gpu-lock   rewrite trainer_image/requirements-gpu.lock from pyproject.toml and constraints.txt"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@# The install takes about 6.5 GB (torch with its CUDA libraries is 4.6 of it): say so up front
	@# rather than as pip's "No space left on device" half-way through.
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 8 ]; then \
		echo "warning: $$free GiB free on this disk; .venv needs about 6.5 GiB, the control plane's Go build cache 5 more" >&2; fi
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
test: install cluster-build tools-build
	$(BIN)/python -m pytest -n 2 --dist loadfile

# actionlint for tests/test_workflows.py, from its pinned Go module into ~/.cache/visionr1/tools
# (its PyPI wrapper downloads a release binary when it builds, which these machines cannot).
tools-build: install
	@if command -v go >/dev/null; then cd tests && ../$(BIN)/python -c "import test_workflows as t; print(t.build_actionlint())"; \
	elif [ "$$CI" = true ]; then echo "error: Go is required to build actionlint" >&2; exit 1; \
	else echo "!!! Go not found: the workflows will NOT be linted !!!" >&2; fi
	@# strace, for the read-only stage run of tests/test_pod_readonly.py (a Debian package).
	@command -v strace >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq strace >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq strace; }; }; } || \
		echo "!!! strace not found: the read-only stage run will be SKIPPED !!!" >&2

# The test control plane (tests/cluster/): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok, and Kueue's manager (for tests/test_cluster_kueue.py), built from
# pinned Go modules into ~/.cache/visionr1/cluster.
# Without Go: one loud line, and the cluster tests skip (CI sets VISIONR1_REQUIRE_CLUSTER=1
# and fails instead).
cluster-build: install
	@if command -v go >/dev/null; then $(BIN)/python tests/cluster/gobuild.py --kueue; \
	elif [ "$$VISIONR1_REQUIRE_CLUSTER" = 1 ]; then echo "error: Go is required to build the test control plane" >&2; exit 1; \
	else echo "!!! Go not found: the tests on the real control plane will be SKIPPED !!!" >&2; fi

# CLUSTER_DIR (default .cluster) holds kubeconfig and logs/; CLUSTER_NODES fake GPU nodes (default 4);
# CLUSTER_KUEUE=1 starts Kueue's manager too.
cluster: cluster-build
	$(BIN)/python tests/cluster/controlplane.py

test-fast: install
	$(BIN)/python -m pytest -x -q -m "not gpu and not slow"

# On a GPU machine: add vLLM and DeepSpeed at the versions of the trainer image's lock
# (trainer_image/requirements-gpu.lock, its pins as constraints; vLLM's CUDA torch replaces
# the CPU one).
gpu-smoke: install
	grep -v '^#' trainer_image/requirements-gpu.lock | sed 's/ --hash=.*//' > $(VENV)/constraints-gpu.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints-gpu.txt -e ".[$(EXTRAS),gpu]"
	$(BIN)/python -m pytest -m gpu -v

# GRPO step time and tokens/s against TRL's GRPOTrainer (results in BENCHMARKS.md).
# The bench extra brings torchvision (TRL's Qwen2.5-VL processor): transformers then picks its
# torchvision image processors by default in this venv (the bench itself uses the PIL one on both sides).
bench-grpo: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/grpo_vs_trl.py --pairs 10
	$(BIN)/python bench/grpo_vs_trl.py --pairs 10 --hidden 256 --layers 4 --max-len 128 --out bench/results/grpo_vs_trl_h256.json
	$(BIN)/python bench/grpo_vs_trl.py --case image --pairs 10
	$(BIN)/python bench/grpo_vs_trl_zero3.py --pairs 10

# The CRD lives twice: crds/ for kubectl, the chart's crds/ for Helm (a test checks both).
crd: install
	$(BIN)/visionr1 crd > crds/visionr1run.yaml
	cp crds/visionr1run.yaml charts/visionr1-operator/crds/visionr1run.yaml

# Tags from the chart's appVersion, as the chart expects them. linux/amd64: the CUDA base and
# the trainer's lock (trainer_image/requirements-gpu.lock) are x86_64 only. BuildKit builds
# (DOCKER_BUILDKIT=1 is the default since Docker 23); .github/workflows/images.yml runs the same.
APP_VERSION = $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/visionr1-operator/Chart.yaml)
images:
	DOCKER_BUILDKIT=1 docker build --platform linux/amd64 -t visionr1/operator:$(APP_VERSION) .
	DOCKER_BUILDKIT=1 docker build --platform linux/amd64 -f trainer_image/Dockerfile -t visionr1/trainer:$(APP_VERSION) .

# Rewrite the trainer image's GPU lock and its file manifest from pyproject.toml and
# constraints.txt (metadata only: no wheel is downloaded; a few minutes).
gpu-lock: install
	nice -n 10 $(BIN)/python trainer_image/lock/resolve.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .cluster
