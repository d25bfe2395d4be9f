# syntax=docker/dockerfile:1
# fedraft site agent for NVIDIA GPUs: `fedraft-client run` with a CUDA build of torch.
#
# Build from the repository root:
#   docker build -f deploy/docker/client-cuda.Dockerfile -t fedraft-client:0.1.0-cuda .
# Run with the NVIDIA Container Toolkit on the host: docker run --gpus all ...
# and `device = "auto"` (or "cuda") in site.toml's [task].
#
# torch's CUDA wheels carry their own CUDA user-space libraries (cuBLAS, cuDNN, ...),
# so the image needs only what the nvidia/cuda *base* flavour adds: the NVIDIA_*
# variables the container toolkit reads and the CUDA runtime. The host needs a driver
# new enough for CUDA_IMAGE's CUDA version. Set CUDA_IMAGE and TORCH_INDEX together
# (for example nvidia/cuda:12.8.1-base-ubuntu24.04 with .../whl/cu128) to match an
# older driver. Ubuntu 24.04 brings Python 3.12 (the project needs >= 3.11).

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------- build: a venv in /opt/fedraft
FROM ${CUDA_IMAGE} AS build
# python3-venv, then torch from the CUDA index at the version pyproject.toml pins.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/fedraft/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/fedraft \
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
FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
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
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FEDRAFT_SITE_CONFIG=/etc/fedraft/site.toml
VOLUME ["/var/lib/fedraft-client"]
WORKDIR /var/lib/fedraft-client
USER 10001:10001
ENTRYPOINT ["tini", "--", "fedraft-entrypoint"]
CMD ["fedraft-client", "run", "--config", "/etc/fedraft/site.toml"]
