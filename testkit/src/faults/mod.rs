//! Shared pieces of the fault suites (`tests/faults_*.rs`, `tests/bad_input.rs`,
//! `tests/secrets.rs`):
//!
//! - `Ledger`: what was committed (the table), what was delivered (message ids in arrival
//!   order) and how rows were marked; prints
//!   `LEDGER <attack>: committed=… delivered=… failed=… lost=0 duplicates=…` and asserts
//!   nothing was lost and every aggregate's first deliveries came in `id` order;
//! - `Producer`: order-service-like writers that keep committing while the database is
//!   attacked (a failed transaction is retried; only committed rows count);
//! - `Proxy`: a TCP proxy on 127.0.0.1 that can freeze (sockets open, nothing forwarded)
//!   or drop (close every connection) the traffic between the relay and a broker, and
//!   `proxy_rounds`, three such attacks in a row with progress required after each, and
//!   `attack_through_proxy`, the run around them (relay, load, producers, rounds);
//! - guards that restore a stopped or blocked service even when a test panics.

mod ledger;
mod producer;
mod proxy;
mod rounds;
mod services;

pub use ledger::*;
pub use producer::*;
pub use proxy::*;
pub use rounds::*;
pub use services::*;
