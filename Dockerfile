# stepup-sidecar image: `docker build -t stepup-sidecar:0.1.0 .` (see README, "Deploy on Kubernetes").
# Stage 1 builds the wheel and installs it with its pinned dependencies into /opt/venv;
# stage 2 is the same slim Python with only that venv: no pip cache, no compiler, no sources.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY sidecar/ sidecar/
# Every dependency has a binary wheel for linux/amd64 and arm64, so no build tools are needed
# even here. constraints.txt pins the versions CI tested.
RUN python -m venv /opt/venv \
 && python -m pip wheel --no-cache-dir --no-deps -w /wheels . \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt /wheels/*.whl \
 && /opt/venv/bin/python -c "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter" \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
 && /opt/venv/bin/stepup-sidecar --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="stepup-sidecar" \
      org.opencontainers.image.description="Envoy ext_authz sidecar: allow, deny or step up (RFC 9470)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STEPUP_POLICY=/etc/stepup/policy.yaml \
    STEPUP_LISTEN=127.0.0.1:9191 \
    STEPUP_EXPLAIN=false
# A numeric user (no passwd entry needed) so Kubernetes can enforce runAsNonRoot.
USER 65532:65532
EXPOSE 9191
ENTRYPOINT ["stepup-sidecar", "serve"]
