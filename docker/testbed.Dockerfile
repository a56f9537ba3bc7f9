# The `testbed` service of docker-compose.yml: the host's kernel does the emulation (the
# service is privileged, on the host's network and PID namespace); this image only carries
# the tools. The repository is mounted at /opt/dualpath-testbed, and `make setup` (run on
# entry, idempotent) makes its virtualenv and the agent image through the host's Docker.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      make python3 python3-venv mininet bridge-utils iproute2 net-tools iperf3 iputils-ping \
      debootstrap docker.io prometheus ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/dualpath-testbed
ENTRYPOINT ["sh", "-c", "make setup >/dev/null && exec \"$@\"", "testbed"]
CMD ["make", "scenario", "NAME=quickstart"]
