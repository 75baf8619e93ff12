//! `gateway-bench`: a load generator for the gateway, in the spirit of `redis-benchmark` and
//! `nats bench`.
//!
//! Scenarios ([`scenario`]): `fanout`, `idle`, `churn` and `max-rate`. Each prints a progress line
//! on stderr (at most once per second) and one JSON summary per run on stdout ([`report`]).
//!
//! The hot path avoids the general WebSocket stack: subscribers read through a minimal RFC 6455
//! reader ([`ws`]) into a per-connection buffer and find the benchmark record ([`payload`]) by a
//! substring search, so a delivery costs no allocation and no JSON parsing. `churn` goes through
//! the typed client ([`gateway_client`]) since connection set-up is what it measures.
//!
//! Safety rails: only loopback targets unless `--allow-remote` ([`target`]); every loop is bounded
//! in count and in time; every option is range-checked ([`cli`]).

pub mod bisect;
pub mod cli;
pub mod metrics;
pub mod payload;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod target;
pub mod ws;
