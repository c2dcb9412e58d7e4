//! PLACEHOLDER — to be replaced by the gen-units implementation.
use clap::Args;

pub const GEN_UNITS_EXAMPLES: &str = "";

#[derive(Debug, Args)]
pub struct GenUnitsArgs {
    pub app: String,
}

pub fn gen_units(_args: &GenUnitsArgs) -> crate::error::Result<()> {
    Err(crate::error::Error::Failed(
        "gen-units is not implemented yet".into(),
    ))
}
