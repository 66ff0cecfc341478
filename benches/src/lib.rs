//! Shoal's criterion benchmarks live in `benches/`; this library holds the
//! reference implementations they compare against (the naive piece picker
//! arrives with the scheduler).
