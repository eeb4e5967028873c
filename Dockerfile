# Runtime image of the annotation daemon: onnxruntime on CPU by default, no training stack.
#   docker build -t edge-annotator .
#   docker build --build-arg VARIANT=gpu -t edge-annotator:gpu .   (onnxruntime-gpu on a CUDA base)
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG GPU_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CPU_BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY protos ./protos
COPY exporter ./exporter
COPY sync ./sync
RUN python -m pip wheel --no-cache-dir --no-deps -w /wheels .

FROM ${CPU_BASE} AS runtime-cpu
ENV EXTRA=""

FROM ${GPU_BASE} AS runtime-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV EXTRA="[gpu]"

FROM runtime-${VARIANT} AS runtime
RUN useradd --system --create-home --uid 10001 annotator
COPY --from=build /wheels /wheels
RUN python -m venv /opt/annotator \
    && /opt/annotator/bin/pip install --no-cache-dir /wheels/*.whl \
    && if [ -n "$EXTRA" ]; then /opt/annotator/bin/pip uninstall -y onnxruntime \
         && /opt/annotator/bin/pip install --no-cache-dir onnxruntime-gpu; fi \
    && rm -rf /wheels
ENV PATH=/opt/annotator/bin:$PATH PYTHONUNBUFFERED=1
USER annotator
WORKDIR /home/annotator
CMD ["annotator", "demo", "--out", "/home/annotator/demo-out"]
