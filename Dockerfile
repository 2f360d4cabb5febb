# Moderator service image.
#   docker build -t moderator .
#   docker run -p 50051:50051 -p 9090:9090 -v $HOME/.cache:/root/.cache moderator
# The default model (ViT-B-32 / laion2b_s34b_b79k) is downloaded on first start and cached under
# /root/.cache; mount it (as above) or bake weights in and pass --pretrained /weights/model.pt.
# `docker run ... moderator serve --demo` serves the bundled demo model with no network.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# torch first: the heaviest layer, and it changes least often. For a CPU-only image, point
# PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index when building (build-arg below).
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY moderator ./moderator
COPY policies ./policies
RUN pip install -e . torch==2.14.1 torchvision==0.29.1

EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["moderator", "health", "--server", "localhost:50051", "--timeout", "2"]
ENTRYPOINT ["moderator"]
CMD ["serve"]
