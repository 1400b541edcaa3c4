# syntax=docker/dockerfile:1
# The image of the GPU stages: logits, train (the PyTorchJob's pods: `fusion train`, which
# starts torchrun and DeepSpeed) and eval. Its entrypoint is the `fusion` CLI. Build from the
# repository root:
#
#   docker build -f images/gpu.Dockerfile -t REGISTRY/fusion-gpu:0.1.0 .
#
# PyPI's torch wheels carry the CUDA libraries; the node's NVIDIA container toolkit provides
# the driver, so the base is the same slim Python as the CPU image. DeepSpeed is installed
# without prebuilt ops (DS_BUILD_OPS=0): the trainer uses torch's optimizer, so nothing is
# compiled at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    PATH=/opt/fusion/venv/bin:$PATH
RUN python -m venv /opt/fusion/venv
COPY images/requirements-build.txt images/requirements-gpu.txt /tmp/
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements-build.txt \
 && pip install --no-cache-dir --require-hashes --no-deps --no-build-isolation -r /tmp/requirements-gpu.txt
COPY pyproject.toml README.md /src/
COPY fusion /src/fusion
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src \
 && pip check
ARG TINY_MODELS=1
ENV FUSION_CACHE_DIR=/opt/fusion/cache TQDM_DISABLE=1 HF_HUB_OFFLINE=1
# (safetensors writes its files 0600: readable by the image's user 10001 only after the chmod)
RUN if [ "$TINY_MODELS" = 1 ]; then python -c "from fusion import tiny; [tiny.model_path(n) for n in tiny.RECIPES]" \
    && chmod -R a+rX /opt/fusion/cache; fi

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 fusion \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin fusion
COPY --from=build /opt/fusion /opt/fusion
ENV PATH=/opt/fusion/venv/bin:$PATH \
    FUSION_CACHE_DIR=/opt/fusion/cache \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["fusion"]
CMD ["--help"]
