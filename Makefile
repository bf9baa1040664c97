# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv when it is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench bench-real bench-budget bench-pretrain bench-trials bench-scale gpu-check lint schema clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (the tested Python is 3.11; set PYTHON=...)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ctssl demo $(DEMO_ARGS)

test: $(STAMP)
	@bash .ci/install-browser.sh  # Debian's chromium for tests/e2e (no-op when installed)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest tests/bench -s -p no:cacheprovider --override-ini="addopts=" $(BENCH_ARGS)

# few-label fine-tuning on a real 8-bit CT folder (images + labels.csv): ctssl vs lightly vs tuned random
bench-real: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make bench-real DATA=<folder with labels.csv> [BUDGET=12m] [OUT=bench-real-out]"; exit 2; }
	$(PY) tests/bench/bench_real.py "$(DATA)" --budget "$(or $(BUDGET),12m)" --out "$(or $(OUT),bench-real-out)" $(BENCH_REAL_ARGS)

# gain versus pre-training budget on the real-CT folder of bench-real: examples/budget-real.yaml with
# DATA and OUT filled in, as one study (PLAN=1: only print its plan)
bench-budget: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make bench-budget DATA=<folder with labels.csv> [OUT=bench-budget-out] [PLAN=1]"; exit 2; }
	mkdir -p "$(or $(OUT),bench-budget-out)"
	sed -e "s#OUT/#$(abspath $(or $(OUT),bench-budget-out))/#g" -e "s#DATA#$(abspath $(DATA))#g" examples/budget-real.yaml > "$(or $(OUT),bench-budget-out)/study.yaml"
	$(VENV)/bin/ctssl study $(if $(PLAN),plan,run) -f "$(or $(OUT),bench-budget-out)/study.yaml"

# ctssl pretrain end to end (start-up included) vs a plain peer loop on the same shards, per method
bench-pretrain: $(STAMP)
	$(PY) tests/bench/bench_pretrain_e2e.py --budget "$(or $(BUDGET),10m)" --out "$(or $(OUT),bench-pretrain-out)" $(if $(DATA),--data "$(DATA)") $(if $(METHODS),--methods "$(METHODS)") $(if $(CTSSL_ARGS),--ctssl-args "$(CTSSL_ARGS)")

# cost per slice and peak RSS of prep, reduce and the study driver as the pool grows (SCALE_SIZES, default 1k,10k,100k
# slices; S3=1 adds the S3 API leg on a local moto server)
bench-scale: $(STAMP)
	SCALE_SIZES="$(or $(SCALE_SIZES),1000,10000,100000)" SCALE_S3="$(S3)" $(PY) tests/bench/bench_scale.py

# on a machine with CUDA: each method's step at 224 px bf16 vs lightly, peak memory, CPU cores to feed a GPU
gpu-check: $(STAMP)
	$(PY) tests/bench/gpu_check.py $(GPU_ARGS)

# ctssl report on a 525-trial study (5 encoders x 7 sizes x 5 folds x 3 seeds) in a real mlflow server
bench-trials: $(STAMP)
	$(PY) -m pytest tests/bench/test_bench_study_trials.py -s -p no:cacheprovider --override-ini="addopts=" $(BENCH_ARGS)

# after an edit of a settings table or of ray_jobs/study/study.schema.json: the schema's table-owned
# keywords, the chart's values schema and the docs' key table
schema: $(STAMP)
	$(PY) -m ray_jobs.study.schema_tables
	$(PY) -m ray_jobs.study.chart_schema
	$(PY) -m ray_jobs.study.reference_doc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf ctssl-demo .pytest_cache
