//! Integration tests: one binary (see kanidm's DO_NOT_ADD_MORE_TESTS_HERE). Each
//! test starts the real service on port 0 with its own issuer, policies and
//! Keycloak (wiremock, or the real Keycloak started by scripts/keycloak.sh).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod agents_real;
mod attacks;
mod audit_day2;
mod bounds_day2;
mod cases;
mod cli;
mod concurrency;
mod day2_review;
mod error_codes;
mod exchange;
mod faultkinds;
mod faults;
mod grants;
mod helpers;
mod identity;
mod identity_real;
mod inventory;
mod keycloak_real;
mod layering;
mod logs;
mod mcp;
mod ops;
mod props;
mod protections;
mod provision;
mod provision_real;
mod reload_day2;
mod replicas;
mod report;
mod schemas;
mod store_day2;
mod token_cli;
mod verification;
