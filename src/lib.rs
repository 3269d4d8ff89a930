//! weft: an HAProxy edge controller for Weave container networks.
//!
//! Data flows one way: sources -> routing table -> render -> apply.
//!
//! - [`escape`]: source text made safe for terminals and log lines ([`escape::Escaped`]).
//! - [`config`]: weft.toml, validated once, every error at once.
//! - [`sources`]: where service definitions come from (services file, Consul, Marathon), each
//!   configured source listed once for the single read and the running tasks.
//! - [`network`]: the weave network's layout (bridge addresses), allowed networks.
//! - [`pages`]: the daemon's memory in small pages, HAProxy's in the host's.
//! - [`bridge`]: keeps this host's weave bridge up (netlink), beside the data flow.
//! - [`model`]: the sources' reports in, the routing table out: every input validated, drops
//!   with reasons.
//! - [`slots`]: which server slot of its backend each server occupies (runtime updates).
//! - [`render`]: table -> haproxy.cfg and maps (askama), deterministic.
//! - [`haproxy`]: the only writer to HAProxy: validate, install, reload, supervise.
//! - [`status`]: what weft routes where and why something is missing (HTML, JSON, healthz).
//! - [`metrics`]: the same view as Prometheus metrics (`/metrics`).
//! - [`controller`]: wires the above into the running daemon.
//! - [`demo`]: the embedded default: demo backends and services for `weft demo`.
//!
//! Imports run one way, and not in the data's order: a module uses only the modules to its
//! left in `escape <- pages <- network <- model <- config <- sources <- slots <- render <- haproxy <-
//! bridge <- metrics <- status <- controller <- demo` (the binary, `main.rs`, on top). The model owns
//! what the sources report (its input), and config owns the defaults it fills in, so neither
//! looks up. `cargo test --test layers` checks it, test modules included.

pub mod bridge;
pub mod config;
pub mod controller;
pub mod demo;
pub mod escape;
pub mod haproxy;
pub mod metrics;
pub mod model;
pub mod network;
pub mod pages;
pub mod render;
pub mod slots;
pub mod sources;
pub mod status;
