# orochi-proxy container image: the stateless proxy only (PostgreSQL nodes run elsewhere).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs: no .git, tests or benchmarks in the image.
COPY pyproject.toml README.md* ./
COPY orochi_proxy ./orochi_proxy
COPY rewriter ./rewriter
COPY executor ./executor
COPY policies ./policies
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /nonexistent orochi
USER orochi
WORKDIR /

EXPOSE 6432 9187
CMD ["orochi-proxy", "serve", "--config", "/etc/orochi/proxy.toml"]
