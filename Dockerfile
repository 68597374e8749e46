# fanout node image: builds the Cython core in a builder stage, ships a slim runtime.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fanout ./fanout
COPY fanout_core ./fanout_core
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 fanout
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER fanout
# WebSocket, ops (health, ready, metrics, publish)
EXPOSE 3004 3002
ENV WS_HOST=0.0.0.0 HEALTH_HOST=0.0.0.0 WS_PORT=3004 HEALTH_PORT=3002
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HEALTH_PORT','3002'), timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["fanout"]
CMD ["serve"]
