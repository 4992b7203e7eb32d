# syntax=docker/dockerfile:1
# bpfm as a Ray node image (head or worker; `ray up` docker mode and KubeRay both run it).
#   CPU:  docker build -t bpfm:cpu .
#   GPU:  docker build -t bpfm:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# The repository lives at /app, so `python /app/pipelines/grid.py` runs without a working_dir.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
# The CPU wheel by default; a CUDA index (e.g. .../whl/cu126) gives the GPU build of the same torch.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, so that bpfm's own requirement cannot pull another build.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY bpfm /src/bpfm
# .[edge]: the paper profile's export variants run ExecuTorch and ONNX Runtime on the nodes
RUN pip install "/src[edge]" && pip check

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# rsync/ssh: `ray up` syncs files into the container; procps: `ray stop` on cluster nodes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client procps \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    BPFM_HOME=/tmp/bpfm
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY bpfm ./bpfm
COPY pipelines ./pipelines
COPY mlflow ./mlflow
COPY cluster ./cluster
# Smoke check at build time: the package, the CLI and Ray import in the final image.
RUN python -c "import bpfm.orchestration.ray_grid, bpfm.tracking" && bpfm --help > /dev/null
EXPOSE 6379 8265 10001
CMD ["bash"]
