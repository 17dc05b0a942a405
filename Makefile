# As in PEFT: `make style` rewrites, `make quality` checks (what CI runs before the tests).
.PHONY: style quality test

style:
	ruff check --fix .
	ruff format .

quality:
	ruff check .
	ruff format --check .

test:
	python -m pytest tests -q
