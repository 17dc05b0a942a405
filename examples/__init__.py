"""The examples are scripts (`python examples/<name>.py`); this file only makes `examples.offline` importable from the
repository root, so that the benchmarks reuse the examples' offline models and data instead of keeping copies. A regular
package, not a namespace one: an editable install elsewhere on the path must not merge its `examples/` into ours."""
