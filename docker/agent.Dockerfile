# The image every emulated node and GPU host runs. The project source is bind-mounted at
# /opt/dualpath at run time, so code changes need no rebuild; only dependencies live here.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The offline base (debootstrap) already carries these tools; the registry base needs them.
RUN for tool in ip ifconfig iperf3 ping ps; do command -v "$tool" >/dev/null || missing=1; done; \
    if [ -n "${missing:-}" ]; then \
      apt-get update && apt-get install -y --no-install-recommends \
        iproute2 net-tools iperf3 iputils-ping procps && rm -rf /var/lib/apt/lists/*; \
    fi

# Dependencies come as wheels prepared on the host: containers may not reach a package index.
COPY wheels /wheels
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels -r /wheels/requirements.txt \
 && rm -rf /wheels

ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/dualpath PYTHONUNBUFFERED=1
WORKDIR /opt/dualpath
CMD ["sleep", "infinity"]
