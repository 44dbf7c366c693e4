//! Shared pieces of the fault suites (`tests/faults_*.rs`, `tests/bad_input.rs`):
//!
//! - `Ledger`: what was committed (the table), what was delivered (message ids in arrival
//!   order) and how rows were marked; prints
//!   `LEDGER <attack>: committed=… delivered=… failed=… lost=0 duplicates=…` and asserts
//!   nothing was lost and every aggregate's first deliveries came in `id` order;
//! - `Producer`: order-service-like writers that keep committing while the database is
//!   attacked (a failed transaction is retried; only committed rows count);
//! - `Proxy`: a TCP proxy on 127.0.0.1 that can freeze (sockets open, nothing forwarded)
//!   or drop (close every connection) the traffic between the relay and a broker;
//! - guards that restore a stopped or blocked service even when a test panics.
//!
//! Include with `mod common;` and `#[path = "fault_support/mod.rs"] mod fault_support;`.
#![allow(dead_code)]

mod kafka;
mod ledger;
mod producer;
mod proxy;
mod services;

// Each suite uses only some of these: an unused re-export is not a warning.
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use ledger::*;
#[allow(unused_imports)]
pub use producer::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use services::*;
