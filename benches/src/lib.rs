//! Benchmarks of the Ember exit path; see `benches/`.
