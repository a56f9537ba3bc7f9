# The DualPath testbed. Run as root on Debian 12 / Ubuntu 22.04+.
VENV := .venv
TESTBED := $(VENV)/bin/testbed
PYTEST := $(VENV)/bin/pytest
TOPOLOGY ?= topologies/1p1d.yaml
PAPER_SCENARIOS := pd-ratio ablation online balance isolation trace

.PHONY: help setup test test-unit fabric-up fabric-down clean scenario bench-fabric bench-dataplane \
	bench-scenarios bench-metrics bench-dilation

help:
	@echo "make setup          install packages, the Docker daemon, the virtualenv, the agent image"
	@echo "make test           run the whole test suite (unit + integration, as root)"
	@echo "make test-unit      only the quick tests that need no root"
	@echo "make fabric-up      bring TOPOLOGY (default $(TOPOLOGY)) up until Ctrl-C"
	@echo "make scenario NAME=x run scenarios/x.yaml: each policy on the same workload"
	@echo "make clean          remove every leftover of earlier runs"
	@echo "make bench-fabric   link rates against iperf3, isolation shares, startup/teardown times"
	@echo "make bench-dataplane agent throughput against iperf3, CPU per GB, where the CPU limits"
	@echo "make bench-scenarios the paper's experiments: $(PAPER_SCENARIOS) (about 4 hours)"
	@echo "make bench-metrics  what exporting the links to Prometheus costs on 2P4D x 8"
	@echo "make bench-dilation virtual time: convergence over TDF 1-16 against the verdict (about 2 hours)"

setup:
	@bash scripts/setup.sh

test:
	$(PYTEST) -q tests

test-unit:
	$(PYTEST) -q tests/unit

fabric-up:
	$(TESTBED) fabric up $(TOPOLOGY)

fabric-down:
	$(TESTBED) fabric down

clean:
	@if [ -x $(TESTBED) ]; then $(TESTBED) clean; else echo "nothing installed yet"; fi

bench-fabric:
	$(VENV)/bin/python -m testbed.bench.fabric

scenario:
	@test -n "$(NAME)" || { echo "usage: make scenario NAME=<a file in scenarios/>"; exit 2; }
	$(TESTBED) scenario run $(NAME)

bench-dataplane:
	$(VENV)/bin/python -m testbed.bench.dataplane

bench-metrics:
	$(VENV)/bin/python -m testbed.bench.metrics

bench-dilation:
	$(VENV)/bin/python -m testbed.bench.dilation

bench-scenarios:
	@for name in $(PAPER_SCENARIOS); do $(TESTBED) scenario run $$name || exit 1; done
