# The two commands of the README. Both bootstrap first (idempotent, quick when done).
.PHONY: bootstrap test test-slurm reproduce table1 table2 sensitivity bench paper tune fixtures scaling

CARGO ?= cargo

bootstrap:
	@scripts/bootstrap.sh

# The whole test suite: formatting, the layering rules, lints, every test of every crate.
test: bootstrap
	$(CARGO) fmt --all --check
	python3 scripts/check_layers.py
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

# A grid as a Slurm job array on a real single-node Slurm (started and stopped by the test),
# one task killed and re-submitted, compared byte for byte with a local run. Needs root.
test-slurm: bootstrap
	$(CARGO) build -p experiments --locked
	scripts/test-slurm.sh

# The second target: the paper's figures (each a config of its own; about 40 minutes together, estimated)
# first, then the headline ablation extended to W6A6 and the plain model (4-4.5 hours from empty), so
# that a sitting too short for all of it still ends with the figures.
PAPER_CONFIGS = configs/fig2_ded.toml configs/fig3a_depth.toml configs/fig3b_p_eta.toml \
	configs/ablation_full.toml

# The main job (README "What make reproduce produces" gives its measured time): the headline
# comparison — Tables 1, 2 and 5 as a controlled ablation at W4A4 on the planted model with 3
# seeds on the full test split (configs/ablation.toml). Finished cells are skipped on a re-run.
# The rest is in second targets, so that this one stays within 90 minutes on 2 cores: `make
# bench` (Table 4, the efficiency benchmark, 30-60 minutes) and `make paper`.
reproduce: table1

# The headline comparison alone: `cargo run -p experiments -- configs/ablation.toml`.
table1: bootstrap
	$(CARGO) run -p experiments --locked -- configs/ablation.toml

# How VEO's and CDM's hyper-parameters were chosen (validation split; not part of reproduce).
tune: bootstrap
	$(CARGO) run -p experiments --locked -- configs/veo-sweep.toml

# Table 2 per question class with statistics on all three embedded variants (plain, planted,
# shifted), every method of the field in both activation settings (README "Table 2 on three
# variants" gives its measured time).
table2: bootstrap
	$(CARGO) run -p experiments --locked -- configs/table2_classes.toml

# The round-to-nearest sensitivity map of the three variants (full split, 3 seeds).
sensitivity: bootstrap
	$(CARGO) run -p experiments --locked -- configs/sensitivity.toml

paper: bootstrap
	@for c in $(PAPER_CONFIGS); do \
		$(CARGO) run -p experiments --locked -- $$c || exit 1; \
	done

# What the search costs as the model grows (issue #21; not part of reproduce: about 2 hours on
# the 2-core machine, run with nothing else on it): random-weight LLaVA checkpoints s0-s4
# (models/scaling/, ~3 GB, not committed), every strategy on them, the cost model fitted and
# extrapolated to LLaVA-1.5-7B/13B. One process per cell, so that each cell's peak RSS is its
# own (a process that ran earlier cells keeps their freed memory); finished cells are skipped.
scaling: bootstrap
	.venv/bin/python python/gen_scaling_series.py
	$(CARGO) build -p experiments --locked
	@for id in $$(target/debug/experiments configs/scaling.toml --dry-run | grep -oE '^  [0-9a-f]{12} '); do \
		target/debug/experiments configs/scaling.toml --cell $$id || exit 1; \
	done
	target/debug/experiments report configs/scaling.toml

# Table 4: the efficiency benchmark (~14 GiB of memory; run with nothing else on the machine). It
# runs again only when its config changed.
bench: results/efficiency/efficiency.csv

results/efficiency/efficiency.csv: configs/efficiency.toml | bootstrap
	$(CARGO) run -p experiments --locked -- bench configs/efficiency.toml

# Regenerate the parity fixtures with the pinned transformers (they are committed).
fixtures: bootstrap
	.venv/bin/python python/gen_llava_fixtures.py
	.venv/bin/python python/gen_qwen2vl_fixtures.py
	.venv/bin/python python/gen_qwen2_5_vl_fixtures.py
