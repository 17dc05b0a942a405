"""The examples are scripts (`python examples/<name>.py`); this file makes their shared models and data importable as
`examples.offline` and `examples.tiny_models`, by the examples (through `_common`) as by the benchmarks and tests, so
that there is one copy under one name. A regular package, not a namespace one: an editable install elsewhere on the
path must not merge its `examples/` into ours."""
