# The two commands of the README. Both bootstrap first (idempotent, quick when done).
.PHONY: bootstrap test reproduce table1 paper fixtures

CARGO ?= cargo

bootstrap:
	@scripts/bootstrap.sh

# The whole test suite: formatting, the layering rules, lints, every test of every crate.
test: bootstrap
	$(CARGO) fmt --all --check
	python3 scripts/check_layers.py
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

# The paper's other tables and figures on the embedded default (each a config of its own).
PAPER_CONFIGS = configs/table2_classes.toml configs/table5_proxy.toml configs/fig2_ded.toml \
	configs/fig3a_depth.toml configs/fig3b_p_eta.toml

# The main job: Table 1 (configs/ablation.toml), then the paper's other tables and figures, then
# the efficiency benchmark (Table 4). Finished cells are skipped on a re-run; the benchmark runs
# again only when its config changed.
reproduce: table1 paper results/efficiency/efficiency.csv

# Table 1 alone: `cargo run -p experiments -- configs/ablation.toml`.
table1: bootstrap
	$(CARGO) run -p experiments --locked -- configs/ablation.toml

paper: bootstrap
	@for c in $(PAPER_CONFIGS); do \
		$(CARGO) run -p experiments --locked -- $$c || exit 1; \
	done

results/efficiency/efficiency.csv: configs/efficiency.toml | bootstrap
	$(CARGO) run -p experiments --locked -- bench configs/efficiency.toml

# Regenerate the parity fixtures with the pinned transformers (they are committed).
fixtures: bootstrap
	.venv/bin/python python/gen_llava_fixtures.py
