# The two commands of the README. Both bootstrap first (idempotent, quick when done).
.PHONY: bootstrap test reproduce fixtures

CARGO ?= cargo

bootstrap:
	@scripts/bootstrap.sh

# The whole test suite: formatting, lints, every test of every crate.
test: bootstrap
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

# The main job: the default experiment on the embedded default model.
reproduce: bootstrap
	$(CARGO) run -p experiments --locked -- configs/ablation.toml

# Regenerate the parity fixtures with the pinned transformers (they are committed).
fixtures: bootstrap
	.venv/bin/python python/gen_llava_fixtures.py
