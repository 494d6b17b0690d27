.PHONY: test unit run bench lint typecheck
PY := .venv/bin/python

test:           ## install into .venv and run the whole suite
	./scripts/test -q

unit:           ## fast unit tests only
	$(PY) -m pytest -q tests/unit

run:            ## start the gateway on :8080
	./scripts/run

bench:          ## proxy benchmark against a direct connection and peers (see bench/README.md)
	$(PY) bench/proxy_bench.py

lint:
	$(PY) -m ruff check src tests bench

typecheck:
	$(PY) -m mypy
