# syntax=docker/dockerfile:1.12
# The operator image: the kopf control plane only (no torch, no CUDA), run as uid 10001.
# Build from the repository root:  docker build --platform linux/amd64 -t visionr1/operator:0.1.0 .
#
# Stage 1 installs the operator extra into a virtualenv under the pinned constraints, its
# dependencies first (from pyproject.toml and constraints.txt alone, so a source change does
# not reinstall them), then the project with --no-deps from a bind mount of the build context
# (no copy of the source in any layer); stage 2 is the same slim base plus that virtualenv:
# no pip run, no wheel built, no compiler.
# The base is pinned by tag and by the digest of its multi-platform index (the one other
# projects record for this tag; `docker buildx imagetools inspect` shows it). tests/test_images.py
# checks the pins, the extra, the user and the entry point.

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The same pip as the Makefile (PIP_VERSION), so the image resolves as `make install` does.
RUN python -m venv /opt/venv && /opt/venv/bin/python -m pip install "pip==26.3"
# The core and the operator extra only: the controller imports the trainer's config models
# (pydantic), never torch. Every pinned dependency ships a cp311 manylinux wheel, so this stage
# needs no compiler.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/ctx/pyproject.toml \
    --mount=type=bind,source=constraints.txt,target=/tmp/ctx/constraints.txt \
    /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('/tmp/ctx/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['operator']))" > /tmp/operator.txt \
    && /opt/venv/bin/python -m pip install -c /tmp/ctx/constraints.txt -r /tmp/operator.txt \
    && rm /tmp/operator.txt
# The project itself (rw: setuptools writes build/ and *.egg-info into the mount; nothing stays).
RUN --mount=type=bind,target=/src,rw \
    /opt/venv/bin/python -m pip install --no-deps /src

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# The chart runs this with readOnlyRootFilesystem and an emptyDir on /tmp: no .pyc written at run
# time (pip compiled them at install), and HOME is /tmp for anything that writes under ~.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --gid 10001 visionr1 \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin visionr1
COPY --from=build /opt/venv /opt/venv
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# Prometheus /metrics and the liveness endpoint /healthz (`python -m visionr1_operator --help`).
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "visionr1_operator"]
