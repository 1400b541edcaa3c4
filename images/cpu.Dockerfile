# syntax=docker/dockerfile:1
# The image of the CPU stages (prepare, split, vocab, align, fuse), the controller and
# `helm test`. Its entrypoint is the `fusion` CLI. Build from the repository root:
#
#   docker build -f images/cpu.Dockerfile -t REGISTRY/fusion-cpu:0.1.0 .
#
# Base image by digest (images/README.md says how to refresh it); dependencies from the
# locked, hashed images/requirements-cpu.txt (regenerate with images/lock).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fusion/venv/bin:$PATH
RUN python -m venv /opt/fusion/venv
COPY images/requirements-build.txt images/requirements-cpu.txt /tmp/
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements-build.txt \
 && pip install --no-cache-dir --require-hashes --no-deps --no-build-isolation -r /tmp/requirements-cpu.txt
COPY pyproject.toml README.md /src/
COPY fusion /src/fusion
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src \
 && pip check
# The built-in tiny models (tiny:target, tiny:src-llama, tiny:src-neox), built once here so that
# every pod of a tiny run uses the same ones; --build-arg TINY_MODELS=0 leaves them out.
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
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["fusion"]
CMD ["--help"]
