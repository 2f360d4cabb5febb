# syntax=docker/dockerfile:1.7
# (BuildKit: only the stages the chosen variant and weights need are built.)
# Moderator service image: multi-stage, non-root (uid 10001), ready for a read-only root
# filesystem (everything it writes goes to /cache and /tmp: mount volumes there).
#
#   docker build -t moderator:cpu .                                  # CPU-only torch (small)
#   docker build -t moderator:cuda --build-arg VARIANT=cuda .        # CUDA torch (host driver)
#   docker build -t moderator:cpu-baked --build-arg WEIGHTS=baked \
#       --build-arg WEIGHTS_SHA256=<sha256 of weights/model.safetensors> .
#   docker run --read-only --tmpfs /tmp -v moderator-cache:/cache --stop-timeout 40 \
#       -p 50051:50051 -p 9090:9090 moderator:cpu
#   docker run ... moderator:cpu serve --demo --policies /etc/moderator/policies/demo
#                                   # the bundled demo model and its policies: no network, no weights
#
# Without baked weights the default model (ViT-B-32 / laion2b_s34b_b79k) is downloaded from the
# hub on first start into /cache/huggingface: give /cache a persistent volume. With
# WEIGHTS=baked, the file weights/model.safetensors of the build context is copied in, checked
# against WEIGHTS_SHA256 (the build fails on a mismatch) and served as --pretrained.
# The README's "Deploying" section has the Kubernetes side.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu
ARG WEIGHTS=none

# -- common environment ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# -- torch, per variant: the heaviest layer, and the one that changes least ------------------
FROM python AS torch-cpu
RUN python -m venv /opt/venv \
 && pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

# PyPI's Linux wheels of torch carry the CUDA runtime libraries; the host (or the Kubernetes
# device plugin) provides the driver.
FROM python AS torch-cuda
RUN python -m venv /opt/venv \
 && pip install torch==2.14.1 torchvision==0.29.1

# -- the package -----------------------------------------------------------------------------
FROM torch-${VARIANT} AS build
# pdqhash (the PDQ hash of every image) has no wheels: it is compiled here, and the runtime
# stage gets the built package without the compiler (libstdc++ is in every Debian image).
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY clients/python ./clients/python
COPY pyproject.toml README.md ./
COPY moderator ./moderator
# Not editable: the venv must not point back into /src. pip compiles the byte code as it
# installs (the running container cannot write it); a separate `compileall` would fail on
# torch's own py312-only test helper. The client package (the generated gRPC code) first:
# the server depends on it and it is not on PyPI.
RUN pip install ./clients/python \
 && pip install '.[tracing]' torch==2.14.1 torchvision==0.29.1

# -- runtime ---------------------------------------------------------------------------------
FROM python AS runtime
ARG VARIANT
RUN groupadd --system --gid 10001 moderator \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/moderator --create-home \
        --shell /usr/sbin/nologin moderator \
 && mkdir -p /cache /etc/moderator \
 && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
COPY policies /etc/moderator/policies
# Everything written at run time lands under /cache (caches) or /tmp. (The decode workers hand
# pixels back through memfd shared memory, which counts against the container's memory limit.)
# MALLOC_ARENA_MAX: glibc's default of 8 arenas per core (the host's cores, not the quota's)
# lets the server's gRPC, torch and pool threads each keep their own freed memory; 2 took its
# peak RSS from 1,612 to 1,453 MiB at no measured cost (BENCHMARKS.md, Memory). The decode
# workers set it for themselves.
ENV HOME=/home/moderator \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    MODERATOR_CACHE_DIR=/cache/moderator \
    MODERATOR_POLICIES=/etc/moderator/policies \
    MALLOC_ARENA_MAX=2 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.opencontainers.image.title="moderator" \
      org.opencontainers.image.description="gRPC image moderation against text policies (CLIP)" \
      io.moderator.variant=${VARIANT}
WORKDIR /home/moderator
USER 10001:10001
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["moderator", "health", "--server", "localhost:50051", "--timeout", "2"]
ENTRYPOINT ["moderator"]
CMD ["serve"]

FROM runtime AS runtime-none

FROM runtime AS runtime-baked
ARG WEIGHTS_SHA256
COPY --chown=0:0 --chmod=0444 weights/model.safetensors /opt/moderator/weights/model.safetensors
RUN test -n "${WEIGHTS_SHA256}" || { echo "WEIGHTS=baked needs --build-arg WEIGHTS_SHA256" >&2; exit 1; } \
 && echo "${WEIGHTS_SHA256}  /opt/moderator/weights/model.safetensors" | sha256sum --check --strict
ENV MODERATOR_PRETRAINED=/opt/moderator/weights/model.safetensors \
    MODERATOR_PRETRAINED_SHA256=${WEIGHTS_SHA256}

FROM runtime-${WEIGHTS}
