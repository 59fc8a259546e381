//! Optional asciicast v2 recording of the session's output.
use std::path::Path;

use tether_protocol::Size;

use crate::tmux::Tmux;
use crate::{Config, Result};

pub async fn start(_tmux: &Tmux, _cfg: &Config, _dir: &Path, _size: Size) -> Result<()> {
    Ok(())
}
