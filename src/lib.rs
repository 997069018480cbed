//! Integration tests and benchmarks of evmm live in `tests/` and `benches/`.
