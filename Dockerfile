# Runtime image of the annotation daemon: onnxruntime on CPU by default, no training stack
# (torch/ultralytics are the `train` extra, never installed here).
#   docker build -t edge-annotator .
#   docker build --build-arg VARIANT=gpu -t edge-annotator:gpu .   (onnxruntime-gpu, CUDA from pip)
#   docker run --gpus all ... edge-annotator:gpu                    (needs the NVIDIA container toolkit)
#   docker run -p 50051:50051 -e ANNOTATOR_SERVER__TOKEN=... \
#       -v annotator-data:/var/lib/annotator -v /srv/annotator:/srv/annotator edge-annotator
#   docker run --rm edge-annotator demo --out /tmp/demo-out   (the shipped demo, no set-up)
# The container runs `annotator serve` with deploy/container.toml as /etc/annotator/annotator.toml
# (it needs a bundle in /var/lib/annotator/store/models/current); HEALTHCHECK asks gRPC health.
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm

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

# The same Python base: onnxruntime-gpu's [cuda,cudnn] extras bring CUDA and cuDNN as pip
# packages of the CUDA major version the wheel was built for. A CUDA base image pins a CUDA of
# its own (12.6 here before, while onnxruntime-gpu 1.31 from PyPI needs libcudart.so.13: the CUDA
# provider would not load and every model would run on the CPU). The driver comes from the host.
FROM ${CPU_BASE} AS runtime-gpu
ENV EXTRA="[gpu]" NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# runtime-${VARIANT} is one of the stages above, not an image from a registry.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
RUN groupadd --system --gid 10001 annotator \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/annotator --no-create-home \
        --shell /usr/sbin/nologin annotator \
    && install -d -m 0750 -o 10001 -g 10001 /var/lib/annotator /var/lib/annotator/store \
    && install -d -m 2770 -o 10001 -g 10001 /srv/annotator /srv/annotator/drop /srv/annotator/sidecars
COPY --from=build /wheels /wheels
# onnxruntime and onnxruntime-gpu share a module name: the GPU variant swaps one for the other.
RUN python -m venv /opt/annotator \
    && /opt/annotator/bin/pip install --no-cache-dir /wheels/*.whl \
    && if [ -n "$EXTRA" ]; then /opt/annotator/bin/pip uninstall -y onnxruntime \
         && /opt/annotator/bin/pip install --no-cache-dir "onnxruntime-gpu[cuda,cudnn]>=1.21"; fi \
    && rm -rf /wheels
COPY --chmod=0644 deploy/container.toml /etc/annotator/annotator.toml
ENV PATH=/opt/annotator/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ANNOTATOR_CONFIG=/etc/annotator/annotator.toml
# A numeric user: Kubernetes' runAsNonRoot can check it without resolving names.
USER 10001:10001
WORKDIR /var/lib/annotator
VOLUME ["/var/lib/annotator", "/srv/annotator"]
EXPOSE 50051
# Bundle loading takes a while on first start; health is exempt from the bearer token. With TLS
# on, the check reads $ANNOTATOR_CONFIG and connects over TLS with the daemon's own certificate.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["annotator", "healthcheck", "--server", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["annotator"]
CMD ["serve", "--config", "/etc/annotator/annotator.toml"]
