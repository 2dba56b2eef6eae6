# guardd in a container (docs/deploy.md, "Containers"): docker build -t guardd .
# The image runs guardd as an unprivileged user with the config deploy/container.yaml: DNS on 53
# (Docker lets containers bind low ports without a capability), SOCKS5 on 1080, the HTTP proxy on
# 3128, metrics on 9477, the audit trail in /var/log/guardd and, as JSON lines, on stdout.
# nftables is in the image for the Kubernetes sidecar's init container (deploy/kubernetes).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin guardd \
 && install -d -o guardd -g guardd -m 0750 /var/log/guardd

WORKDIR /src
COPY pyproject.toml README.md ./
COPY guardd ./guardd
RUN pip install --no-cache-dir . && rm -rf /src

COPY policies/default.yaml /etc/guardd/policy.yaml
COPY policies/lists /etc/guardd/lists
COPY deploy/container.yaml /etc/guardd/guardd.yaml

USER 10001
WORKDIR /var/log/guardd
EXPOSE 53/udp 53/tcp 1080/tcp 3128/tcp 9477/tcp
HEALTHCHECK --interval=30s --timeout=3s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=2)"
ENTRYPOINT ["guardd"]
CMD ["run", "--config", "/etc/guardd/guardd.yaml"]
