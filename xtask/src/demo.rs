//! `cargo xtask demo`: the story end to end on a real disk image.

use anyhow::Result;

/// Run the demo.
pub fn run() -> Result<()> {
    Ok(())
}
