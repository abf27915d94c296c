//! Switchyard: an edge reverse proxy and blue/green traffic switcher on
//! Pingora. The binary in `main.rs` is a thin command-line front end over
//! these modules.

pub mod acme;
pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod tls;
