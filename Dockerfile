# pdp: the decision service. Build: docker build -t pdp .
FROM python:3.11-slim

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pdp pdp
COPY adapters adapters
COPY policies policies
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
USER 65532:65532
# HTTP (/v1/check, /ext_authz, probes, metrics) and Envoy's gRPC ext_authz, both on every interface of the
# container: on 127.0.0.1 they could not be reached from outside it.
EXPOSE 8181 9191
# Ready (policy and trust bundles loaded), not merely up. A config with [server.tls] needs a probe that
# presents an allowed caller's certificate: compose.yaml overrides this check with one.
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8181/readyz')"
CMD ["pdp", "serve", "--http", "0.0.0.0:8181", "--grpc", "0.0.0.0:9191"]
