# mnist-serving: one image for the server (default command) and the trainer (`mnist-train`).
#   docker build -t mnist-serving:0.1.0 .
# Stage 1 builds a virtualenv from wheels; stage 2 copies only that venv and the committed
# default model onto the same slim base: no pip cache, no build tools, no source tree.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# The locked set CI tested (requirements/*.lock, written by scripts/lock.py): --no-deps installs
# exactly those versions; every one ships manylinux wheels, so --only-binary keeps compilers out
# of even this stage.
COPY requirements/build.lock requirements/runtime.lock /src/requirements/
RUN /opt/venv/bin/pip install --only-binary=:all: -r requirements/build.lock \
    && /opt/venv/bin/pip install --only-binary=:all: --no-deps -r requirements/runtime.lock
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY trainer /src/trainer
# The client too: operators run `docker exec ... mnist-client set-current` inside a container
# (docs/deployment.md), and the real-engine test does.
COPY mnist_client /src/mnist_client
# Image decoding and MNIST preprocessing, shared by the client and the server's decoders.
COPY mnist_imaging /src/mnist_imaging
# Installed as a wheel (not editable) and byte-compiled here, so containers start without
# compiling and run on a read-only root file system; the locked setuptools builds it.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation /src

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MNIST_MODEL_DIR=/models \
    MNIST_HOST=0.0.0.0 \
    MNIST_PORT=50051 \
    MNIST_METRICS_PORT=9100 \
    MNIST_GRACE_PERIOD_S=10 \
    MNIST_DATA_DIR=/data
RUN groupadd --system --gid 10001 mnist \
    && useradd --system --uid 10001 --gid mnist --home-dir /nonexistent --shell /usr/sbin/nologin mnist
COPY --from=build /opt/venv /opt/venv
# The committed default model seeds the named volume the first time it is mounted; the trainer
# publishes new versions into the same volume and the server hot-swaps to them.
COPY --chown=mnist:mnist models /models
WORKDIR /data
RUN chown 10001:10001 /data
VOLUME ["/models"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 8000 9100
# The gRPC health service, not a TCP probe: NOT_SERVING until a model is loaded and while
# draining after SIGTERM.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service.healthcheck", "--timeout-s", "3"]
# SIGTERM starts a graceful stop of MNIST_GRACE_PERIOD_S; the orchestrator's grace must be longer.
STOPSIGNAL SIGTERM
CMD ["mnist-serve"]
