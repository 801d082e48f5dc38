//! keycloak-ci-sts: a security token service that exchanges Bitbucket Pipelines
//! OIDC ID tokens (RFC 8693) for short-lived Keycloak access tokens whose client,
//! audience and scopes are chosen by reviewed policy files.
//!
//! Layout, imports running one way: [`cli`] → [`startup`] → [`api`] (thin actix
//! handlers) and [`reload`] → [`state`] → [`exchange`] (the RFC 8693 exchange for
//! any caller) → [`verify`] (Bitbucket tokens), [`policy`] (decisions),
//! [`keycloak`] (the client_credentials grant), [`limits`], [`audit`] →
//! [`domain`]. [`configuration`] builds the lower modules' settings.

// No unsafe code in the library (the binary sets one allocator option: main.rs).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "unit tests may panic"
    )
)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod client;
pub mod configuration;
pub mod domain;
pub mod exchange;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod http;
pub mod inspect;
pub mod inventory;
pub mod keycloak;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod provision;
pub mod reload;
pub mod report;
pub mod signing;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod verify;
