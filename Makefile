.PHONY: test unit run bench stress check lint typecheck proto
PY := .venv/bin/python

test:           ## install into .venv and run the whole suite
	./scripts/test -q

unit:           ## fast unit tests only
	$(PY) -m pytest -q tests/unit

run:            ## start the gateway on :8080
	./scripts/run

bench:          ## proxy, limiter, inference, engine, routing and tenant benchmarks (results: bench/RESULTS.md)
	$(PY) bench/proxy_bench.py
	$(PY) bench/ratelimit_bench.py
	$(PY) bench/inference_bench.py
	$(PY) bench/engine_bench.py
	$(PY) bench/routing_bench.py
	$(PY) bench/tenant_bench.py

stress:         ## the stress harness's long run (results: bench/RESULTS.md, "Stress")
	$(PY) -m bench.stress.run

check:          ## what every commit must pass: format, lint, types
	$(PY) -m ruff format --check src tests bench scripts
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m mypy

lint:
	$(PY) -m ruff check src tests bench scripts

typecheck:
	$(PY) -m mypy

proto:          ## regenerate src/proxygate/_pb from proto/inference.proto
	$(PY) scripts/gen_proto.py
