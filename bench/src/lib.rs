//! Benchmark harness for Switchyard: a load generator, a fixed-response
//! backend, and the compare, release and memory scenarios built on them.
//! Everything it starts or connects to is on the loopback interface.

pub mod affinity;
pub mod backend;
pub mod certs;
pub mod client;
pub mod compare;
pub mod load;
pub mod memory;
pub mod procstat;
pub mod proxies;
pub mod release;
pub mod report;
pub mod schedule;
pub mod target;
