# unify-dist: every target sets up .venv itself, so each works on a fresh clone.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# Where datasets live. Point it at a folder holding FashionMNIST/raw/*.gz; by default .data/, linked to
# ../shared/data when that exists (offline machines), else filled by torchvision's download when online.
export UNIFY_DIST_DATA_ROOT ?= $(CURDIR)/.data
export OMP_NUM_THREADS ?= 1
NPROC   ?= 2
ROUNDS  ?= 30

.PHONY: demo test test-fast bench reproduce robust skew dp netns data clean

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

demo: $(STAMP) data
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m unify_dist train --config configs/demo_cpu.toml

test: $(STAMP) data
	$(PY) -m pytest -q --durations=20

test-fast: $(STAMP) data
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP) data
	$(PY) -m benchmarks.bench

reproduce: $(STAMP) data
	$(PY) -m pip install -q matplotlib || echo "matplotlib not installed: the report will have tables but no plots"
	$(PY) -m experiments.reproduce --rounds $(ROUNDS) --out results

# Beyond the paper (experiments/suites.py): 4 owners with a hostile one; label-skewed owners; DP noise.
robust skew dp: $(STAMP) data
	$(PY) -m experiments.suites $@

# unify-dist avg vs DistributedDataParallel over a 100 Mbit/s link between two network namespaces (root).
netns: $(STAMP) data
	PYTHON=$(PY) launch/netns_time_to_accuracy.sh configs/paper_v.toml

clean:
	rm -rf runs results .pytest_cache
