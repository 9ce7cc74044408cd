# The two commands of the README's Quick start. Both set up .venv on first use.
.PHONY: setup demo test test-fast lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cosytune demo

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

# The quick check: unit and golden-parity tiers, without their slow tests (a couple of minutes on 2 cores).
test-fast: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "(unit or golden) and not slow" tests/unit tests/parity

lint: setup
	.venv/bin/ruff check src tests
