# midimatch worker (and the index-build Job): `midimatch worker`, torch + numba.
#   docker build -f k8s/images/worker.Dockerfile -t midimatch-worker:TAG .                 CUDA
#   docker build -f k8s/images/worker.Dockerfile --build-arg TORCH=cpu -t ...:TAG-cpu .    CPU (dev)
# CUDA: PyPI's torch wheels carry the CUDA runtime (torch-cuda.lock); the node needs only the
# NVIDIA driver and device plugin. CPU: PyTorch's +cpu wheels (torch-cpu.lock), ~1 GB smaller.
# BASE: any Debian-based image with CPython 3.11 as `python3` (the locks are for 3.11, x86_64).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH=cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY k8s/images/worker.lock k8s/images/torch-cuda.lock k8s/images/torch-cpu.lock /tmp/
RUN test "$TORCH" = cuda || test "$TORCH" = cpu \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r /tmp/worker.lock -r "/tmp/torch-${TORCH}.lock"

FROM ${BASE}
ARG TORCH=cuda
LABEL org.opencontainers.image.title="midimatch-worker" \
      org.opencontainers.image.description="midimatch streaming worker and index builder" \
      midimatch.torch="${TORCH}"
# libgomp1: numba's OpenMP threading layer. Without it numba falls back to its workqueue layer,
# which aborts the process when two threads launch parallel kernels at once (the kernels release
# the GIL, so they can); NUMBA_THREADING_LAYER=omp below makes a missing library an error at the
# first parallel kernel instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY server /app/server
COPY worker /app/worker
COPY model /app/model
COPY index /app/index
COPY k8s/images/probe.py /app/probe.py
RUN mkdir -p /var/cache/numba && chown 10001:10001 /var/cache/numba
# Read-only root filesystem: everything written goes under /tmp (an emptyDir in Kubernetes);
# numba's compiled kernels are cached in NUMBA_CACHE_DIR (its own volume, kept across restarts
# of the container).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/var/cache/numba \
    NUMBA_THREADING_LAYER=omp \
    MIDIMATCH_CACHE=/tmp/midimatch-cache \
    MIDIMATCH_METRICS_PORT=9101
USER 10001:10001
WORKDIR /app
EXPOSE 9101
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/app/probe.py", "worker-live"]
ENTRYPOINT ["python", "-m", "server.cli"]
CMD ["worker"]
