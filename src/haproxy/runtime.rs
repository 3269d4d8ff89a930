//! The admin stats socket: runtime state of the running worker.

use std::path::Path;

use super::{cli_command, CliError};

/// The state of every server as `server-state-file` wants it: `show servers state` output.
///
/// Saved before each reload so the new worker starts with the old one's server states (checks
/// passed or failed, maintenance) instead of assuming every server up.
pub async fn show_servers_state(admin_socket: &Path) -> Result<String, CliError> {
    cli_command(admin_socket, "show servers state").await
}
