# tokensvc: multi-stage, slim, non-root. Build: docker build -t tokensvc .
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/tokensvc
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY tokensvc ./tokensvc
COPY migrations ./migrations
# The same install as `make run`, without the test tools.
RUN /opt/tokensvc/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/tokensvc/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data tokensvc \
 && mkdir /data && chown tokensvc /data
COPY --from=build /opt/tokensvc /opt/tokensvc
COPY --from=build /src/migrations /opt/tokensvc/migrations
ENV PATH=/opt/tokensvc/bin:$PATH \
    TOKENSVC_DATA_DIR=/data \
    TOKENSVC_MIGRATIONS_DIR=/opt/tokensvc/migrations \
    TOKENSVC_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER tokensvc
VOLUME /data
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-m", "tokensvc.healthcheck", "127.0.0.1:50051"]
CMD ["tokensvc", "serve", "--listen", "0.0.0.0:50051"]
