# syntax=docker/dockerfile:1
# fedraft site agent: `fedraft-client run`, CPU-only torch.
# For NVIDIA GPUs use client-cuda.Dockerfile instead.
#
# Build from the repository root:
#   docker build -f deploy/docker/client.Dockerfile -t fedraft-client:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv in /opt/fedraft
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fedraft/bin:$PATH
# torch first, CPU-only, at the version pyproject.toml pins.
RUN python -m venv /opt/fedraft \
 && pip install --index-url "${TORCH_INDEX}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY client ./client
COPY privacy ./privacy
RUN pip install . \
 && pip check \
 && fedraft-client --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fedraft \
 && useradd --system --uid 10001 --gid fedraft --home-dir /var/lib/fedraft-client \
        --shell /usr/sbin/nologin fedraft \
 && install -d -o fedraft -g fedraft -m 0750 /var/lib/fedraft-client \
 && install -d -m 0755 /etc/fedraft
COPY --from=build /opt/fedraft /opt/fedraft
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/fedraft-entrypoint
ENV PATH=/opt/fedraft/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FLWR_TELEMETRY_ENABLED=0 \
    FEDRAFT_SITE_CONFIG=/etc/fedraft/site.toml
# The agent only dials out (fleet API of the nodes): no port to expose and nothing to
# probe from outside; its exit status and logs are the health signal, and the restart
# policy (compose restart:, Kubernetes, systemd Restart=) brings it back.
VOLUME ["/var/lib/fedraft-client"]
WORKDIR /var/lib/fedraft-client
USER 10001:10001
ENTRYPOINT ["tini", "--", "fedraft-entrypoint"]
CMD ["fedraft-client", "run", "--config", "/etc/fedraft/site.toml"]
