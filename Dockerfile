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
EXPOSE 8181
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8181/healthz')"
CMD ["pdp", "serve", "--http", "0.0.0.0:8181"]
