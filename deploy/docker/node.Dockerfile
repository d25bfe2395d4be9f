# syntax=docker/dockerfile:1
# fedraft coordinator node: `fedraft node start`, CPU-only torch.
#
# Build from the repository root (the context must hold pyproject.toml):
#   docker build -f deploy/docker/node.Dockerfile -t fedraft-node:0.1.0 .
# Run (config, TLS files and the Raft password are mounted, never baked in):
#   docker run -v ./n1.toml:/etc/fedraft/node.toml:ro ... fedraft-node:0.1.0

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv in /opt/fedraft
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fedraft/bin:$PATH
# torch first, from the CPU-only index and at the version pyproject.toml pins, so that
# installing the project finds it satisfied instead of pulling a CUDA build (GBs).
RUN python -m venv /opt/fedraft \
 && pip install --index-url "${TORCH_INDEX}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY client ./client
COPY privacy ./privacy
RUN pip install . \
 && pip check \
 && fedraft --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
# tini reaps the worker processes the node starts and forwards SIGTERM to it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fedraft \
 && useradd --system --uid 10001 --gid fedraft --home-dir /var/lib/fedraft \
        --shell /usr/sbin/nologin fedraft \
 && install -d -o fedraft -g fedraft -m 0750 /var/lib/fedraft \
 && install -d -m 0755 /etc/fedraft
COPY --from=build /opt/fedraft /opt/fedraft
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/fedraft-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/fedraft-healthcheck
ENV PATH=/opt/fedraft/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDRAFT_NODE_CONFIG=/etc/fedraft/node.toml
# raft (private network only), fleet (sites), admin (operators and peer nodes)
EXPOSE 7100 7200 7300
VOLUME ["/var/lib/fedraft"]
WORKDIR /var/lib/fedraft
USER 10001:10001
# Status over mTLS with the node's own certificate; the first minute is start-up
# (Raft journal replay, audit catch-up).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["fedraft-healthcheck", "--timeout", "5"]
ENTRYPOINT ["tini", "--", "fedraft-entrypoint"]
CMD ["fedraft", "node", "start", "--config", "/etc/fedraft/node.toml"]
