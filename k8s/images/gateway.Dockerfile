# midimatch gateway: `midimatch serve` with MIDIMATCH_REDIS_URL set (websocket gateway only, no
# worker). No torch, no numba: ~140 MB of Python packages on top of the base.
#   docker build -f k8s/images/gateway.Dockerfile -t midimatch-gateway:TAG .     (repo root)
# BASE: any Debian-based image with CPython 3.11 as `python3` (the locks are for 3.11, x86_64).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY k8s/images/gateway.lock /tmp/gateway.lock
# --no-deps: the lock is the whole closure, nothing is resolved at build time
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r /tmp/gateway.lock

FROM ${BASE}
LABEL org.opencontainers.image.title="midimatch-gateway" \
      org.opencontainers.image.description="midimatch websocket gateway (serve --redis)"
COPY --from=build /opt/venv /opt/venv
# The packages are imported from /app (no `pip install .`): server/static ships with them.
COPY server /app/server
COPY worker /app/worker
COPY model /app/model
COPY index /app/index
COPY k8s/images/probe.py /app/probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MIDIMATCH_CACHE=/tmp/midimatch-cache \
    MIDIMATCH_HOST=0.0.0.0 \
    MIDIMATCH_PORT=8080
USER 10001:10001
WORKDIR /app
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "/app/probe.py", "gateway"]
ENTRYPOINT ["python", "-m", "server.cli"]
CMD ["serve"]
