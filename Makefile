# unify-dist: every target sets up .venv itself, so each works on a fresh clone.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# Where datasets live. Point it at a folder holding FashionMNIST/raw/*.gz; by default .data/, linked to
# ../shared/data when that exists (offline machines), else filled by torchvision's download when online.
export UNIFY_DIST_DATA_ROOT ?= $(CURDIR)/.data
export OMP_NUM_THREADS ?= 1
NPROC   ?= 2
ROUNDS  ?= 30

.PHONY: demo demo-trust test test-fast bench bench-links bench-unequal bench-compress bench-lora-links reproduce robust skew dp netns data clean

$(STAMP): pyproject.toml
	python3 -m venv --system-site-packages .venv
	@# torch/torchvision already importable (GPU images ship them): keep them; else the registry's newest pair.
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q "torch>=2.4" "torchvision>=0.19"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

data:
	@mkdir -p "$(UNIFY_DIST_DATA_ROOT)/FashionMNIST/raw" "$(UNIFY_DIST_DATA_ROOT)/MNIST/raw"
	@for pair in fashion-mnist:FashionMNIST mnist:MNIST; do \
	  src=../shared/data/$${pair%%:*}; dst="$(UNIFY_DIST_DATA_ROOT)/$${pair##*:}/raw"; \
	  if [ -d "$$src" ]; then for f in "$$src"/*.gz; do [ -e "$$dst/$$(basename $$f)" ] || ln -s "$$(realpath $$f)" "$$dst/"; done; fi; \
	done

# output.resume=false: the demo trains afresh each time (resumed, a finished run would only show its record)
demo: $(STAMP) data
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m unify_dist train --config configs/demo_cpu.toml \
	  --set output.resume=false

test: $(STAMP) data
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP) data
	$(PY) -m benchmarks.bench

reproduce: $(STAMP) data
	$(PY) -m pip install -q matplotlib || echo "matplotlib not installed: the report will have tables but no plots"
	$(PY) -m experiments.reproduce --rounds $(ROUNDS) --out results

# The demo with [trust] on (docs/trust.md): fresh identity keys for both owners, a roster, then the same run,
# admitted and sealed. Keys and run under runs/demo_trust/.
DT := runs/demo_trust
demo-trust: $(STAMP) data
	@mkdir -p $(DT) && rm -f $(DT)/owner*.key $(DT)/owner*.key.pub && echo "[owners]" > $(DT)/roster.toml
	@for i in 0 1; do $(PY) -m unify_dist keygen --out $(DT)/owner$$i.key --name owner$$i | tail -n 1 | sed 's/^[^:]*: //' >> $(DT)/roster.toml; done
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m unify_dist train --config configs/demo_cpu.toml \
	  --set trust.enabled=true --set trust.roster=$(DT)/roster.toml --set 'trust.key=$(DT)/owner{rank}.key' \
	  --set 'trust.owner=owner{rank}' --set output.dir=$(DT)/run --set output.resume=false

# Beyond the paper (experiments/suites.py): 4 owners with a hostile one; label-skewed owners; DP noise.
robust skew dp: $(STAMP) data
	$(PY) -m experiments.suites $@

# unify-dist avg vs DistributedDataParallel over a 100 Mbit/s link between two network namespaces (root).
netns: $(STAMP) data
	PYTHON=$(PY) launch/netns_time_to_accuracy.sh configs/paper_v.toml

# unify-dist vs DDP vs Flower FedAvg (deployment engine and legacy API) over shaped links between three network
# namespaces (root): round overhead, bytes per host, time to 88%; results/bench_links.json and a plot. QUICK=1: a
# few minutes. flwr and matplotlib go into .flwr/ with pip --target, not into .venv: a separate venv would need a
# torch of its own (gigabytes, and none offline), while flwr's own pins (numpy, protobuf, grpcio, cryptography)
# must not change what unify-dist runs with; only Flower's processes and the plot put .flwr/ on their path.
FLWR_DIR := .flwr
$(FLWR_DIR)/.installed:
	$(PY) -m pip install -q --target $(FLWR_DIR) "flwr==1.42.*" matplotlib
	touch $@

bench-links: $(STAMP) data $(FLWR_DIR)/.installed
	PYTHON=$(PY) FLWR_DIR=$(FLWR_DIR) launch/netns_bench_links.sh

# Owners of different speeds (issue 19): node B held to a third of a core by a cgroup v1 quota, time to 88% in
# epoch rounds, time-budget rounds and overlapped rounds, over 100 and 20 Mbit links (root). About 10 min per rate.
bench-unequal: $(STAMP) data
	for rate in 100mbit 20mbit; do PYTHON=$(PY) RATE=$$rate launch/netns_unequal.sh configs/paper_v.toml || exit $$?; done

# A compressed unify (bf16, int8) against plain avg over one shaped 20 Mbit link between two network
# namespaces (root), resnet18, 3 rounds: ratios against issue 19's targets; results/bench_compress.json.
# OWNERS=4 (and e.g. RATE=100mbit): 4 owners, each behind its own link (the sharded 16-bit sum).
bench-compress: $(STAMP)
	PYTHON=$(PY) launch/netns_bench_compress.sh

# A LoRA adapter with LLaMA-7B's shapes (8.4M elements, no base weights) unified by 4 owners, each behind its own
# 100 Mbit link (root: five network namespaces): unify time against the link's floor in fp32 and bf16, and Flower's
# adapter-only FedAvg beside it; results/bench_lora_links.json. `make bench-links` runs it too (LORA=0 skips it).
bench-lora-links: $(STAMP) $(FLWR_DIR)/.installed
	PYTHON=$(PY) FLWR_DIR=$(FLWR_DIR) launch/netns_bench_lora_links.sh

clean:
	rm -rf runs results .pytest_cache
