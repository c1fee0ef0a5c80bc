# tokensvc: multi-stage, slim, non-root. Build: make image (or docker build -t tokensvc .)
# BASE_IMAGE: any Debian-like image with python3 (3.11 or newer) and its venv
# module; both stages use it, so the virtualenv finds the same interpreter.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Set when pip must trust a CA bundle of the build host's (a TLS-inspecting proxy).
ARG PIP_CERT
WORKDIR /src
RUN python3 -m venv /opt/tokensvc \
 && /opt/tokensvc/bin/pip install --no-cache-dir --quiet --upgrade pip
# The dependencies first, in a layer of their own: it is rebuilt only when
# pyproject.toml changes, not on every change of the code.
COPY pyproject.toml README.md ./
RUN mkdir tokensvc && touch tokensvc/__init__.py \
 && /opt/tokensvc/bin/pip install --no-cache-dir --quiet . \
 && rm -rf tokensvc build
COPY tokensvc ./tokensvc
RUN /opt/tokensvc/bin/pip install --no-cache-dir --quiet --no-deps . && rm -rf build
COPY migrations /opt/tokensvc/migrations

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 tokensvc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home tokensvc \
 && mkdir /data && chown 10001:10001 /data && chmod 0700 /data
COPY --from=build /opt/tokensvc /opt/tokensvc
# Listen addresses are settings, not flags, so that the HEALTHCHECK (which
# reads the same settings) follows them when they change.
ENV PATH=/opt/tokensvc/bin:$PATH \
    TOKENSVC_LISTEN=0.0.0.0:50051 \
    TOKENSVC_METRICS_LISTEN=0.0.0.0:9464 \
    TOKENSVC_DATA_DIR=/data \
    TOKENSVC_MIGRATIONS_DIR=/opt/tokensvc/migrations \
    TOKENSVC_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
VOLUME /data
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-m", "tokensvc.healthcheck"]
CMD ["tokensvc", "serve"]
