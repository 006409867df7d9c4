# The operator image: the kopf control plane only (no torch), non-root.
# Build: docker build -t visionr1/operator:0.1.0 .
# Stage 1 builds wheels (a compiler may be needed for some); stage 2 installs them only.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
RUN python -m pip install --no-cache-dir "pip==26.3"
COPY pyproject.toml constraints.txt README.md ./
COPY operator/ operator/
COPY trainer_image/visionr1_trainer/ trainer_image/visionr1_trainer/
# The operator extra only; the pinned constraints keep the image reproducible.
RUN python -m pip wheel --no-cache-dir -c constraints.txt --wheel-dir /wheels ".[operator]"

FROM python:3.11.7-slim-bookworm
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin visionr1
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels "visionr1[operator]" \
    && rm -rf /wheels
USER 10001
# Metrics and liveness ports (see `python -m visionr1_operator --help`).
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "visionr1_operator"]
