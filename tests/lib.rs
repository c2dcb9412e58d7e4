//! Entry point of the single `integration` test binary: every integration test
//! module is listed here, so they share one compilation and the `support`
//! helpers (Cargo's `autotests` is off; see Cargo.toml).

mod cli;
mod faults;
mod gen_units;
mod limits;
mod package;
mod policy;
mod recycle;
mod run;
mod servers;
mod support;
mod systemd_e2e;
mod systemd_smoke;
mod upgrade;
