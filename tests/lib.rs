//! All integration tests, compiled into one test binary (see `[[test]]` in Cargo.toml).

mod gen_units;
