//! Benchmarks of Ember's exit path.
//!
//! * `benches/bus_dispatch.rs` (criterion): lookup and dispatch of one access on an
//!   [`ember_bus::Bus`] with 1, 8 and 64 devices, and the unclaimed-address path.
//! * `src/bin/exit_rate.rs` (`cargo run --release -p ember-benches --bin exit-rate`): a
//!   whole VM whose guest loops on `out dx, al` or an MMIO store, run once through a bare
//!   `KVM_RUN` loop (the floor) and once through [`ember_vcpu::Vcpu::run`], with wall
//!   and CPU time per exit side by side.
//!
//! This library holds what both share and what is worth unit-testing: the trivial
//! device ([`device`]), the guests ([`guest`]), the VM set-up ([`vm`]), the two run
//! loops ([`measure`]), the summary and Markdown table ([`report`]) and the command
//! line ([`args`]).

#![deny(missing_docs)]

pub mod args;
pub mod device;
mod error;
pub mod guest;
pub mod measure;
pub mod report;
pub mod vm;

pub use error::Error;
