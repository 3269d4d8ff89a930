//! The admin stats socket: changes without a reload, and the running worker's server state.
//!
//! Every batch starts with `set severity-output number`, so each answer line that reports a
//! problem carries `[N]:`; N <= 3 is an error. Some failures (a bad address) come back as a
//! warning, so answers are also read for HAProxy's error words, and the result is confirmed
//! with `show servers state` afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use tracing::warn;

use super::files::write_atomic;
use super::plan::{commands, filter_server_state, CertChange, MapUpdate, RuntimePlan};
use super::{cli_command, cli_payload, CliError};
use crate::render::{cert_file, CRT_LIST};
use crate::slots::Slots;

/// Longest command line sent at once; HAProxy's CLI buffer is 16 kB by default.
const MAX_LINE: usize = 8 * 1024;
/// Words HAProxy uses in answers that mean the command did nothing.
const ERROR_WORDS: [&str; 7] = [
    "Invalid",
    "No such",
    "Unknown",
    "not found",
    "Permission denied",
    "Require",
    "failed",
];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error("{command:?} failed: {answer}")]
    Rejected { command: String, answer: String },
    #[error("unexpected answer to {command:?}: {answer:?}")]
    Answer { command: String, answer: String },
    #[error("backend {backend} server {server} runs {actual}, expected {expected}")]
    Mismatch {
        backend: String,
        server: String,
        actual: String,
        expected: String,
    },
}

/// A CLI argument with HAProxy's separators escaped.
fn escape(arg: &str) -> String {
    arg.replace('\\', "\\\\").replace(';', "\\;")
}

/// Runs commands in batches and fails on the first answer that reports an error.
pub async fn run_commands(admin: &Path, commands: &[String]) -> Result<(), RuntimeError> {
    let mut batch: Vec<&str> = Vec::new();
    let mut length = 0;
    for command in commands {
        if length + command.len() > MAX_LINE && !batch.is_empty() {
            run_batch(admin, &batch).await?;
            batch.clear();
            length = 0;
        }
        length += command.len() + 1;
        batch.push(command);
    }
    if !batch.is_empty() {
        run_batch(admin, &batch).await?;
    }
    Ok(())
}

async fn run_batch(admin: &Path, batch: &[&str]) -> Result<(), RuntimeError> {
    let line = format!("set severity-output number;{}", batch.join(";"));
    let answer = cli_command(admin, &line).await?;
    check_answer(&line, &answer)
}

/// An answer is good when no part of it carries severity 0-3 or an error word.
fn check_answer(command: &str, answer: &str) -> Result<(), RuntimeError> {
    for part in answer
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let severity = part
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("]:"))
            .and_then(|(n, _)| n.parse::<u8>().ok());
        let error = matches!(severity, Some(n) if n <= 3)
            || ERROR_WORDS.iter().any(|word| part.contains(word));
        // "no need to change the addr" is HAProxy telling that only the port changed.
        if error && !part.contains("no need to change") {
            return Err(RuntimeError::Rejected {
                command: command.chars().take(200).collect(),
                answer: part.to_string(),
            });
        }
    }
    Ok(())
}

/// Runs a same-structure plan: servers put in service first (a moved backend is never
/// empty), then the maps, then servers taken out; then confirms every touched slot.
pub async fn execute(admin: &Path, map_dir: &Path, plan: &RuntimePlan) -> Result<(), RuntimeError> {
    for change in &plan.certs {
        change_cert(admin, map_dir, change).await?;
    }
    run_commands(admin, &commands(&plan.enable)).await?;
    for (file, update) in &plan.maps {
        let map = map_dir.join(file);
        match update {
            MapUpdate::Replace(entries) => {
                let entries: Vec<(&str, &str)> = entries
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                replace_map(admin, &map, &entries).await?;
            }
            MapUpdate::Entries { del, set, add } => {
                run_commands(admin, &entry_commands(&map, del, set, add)).await?
            }
        }
    }
    run_commands(admin, &commands(&plan.disable)).await?;
    verify_servers(admin, &plan.expected).await
}

/// The commands that change a map entry by entry: `del map`, `set map`, `add map`.
fn entry_commands(
    map: &Path,
    del: &[String],
    set: &[(String, String)],
    add: &[(String, String)],
) -> Vec<String> {
    let map = escape(&map.display().to_string());
    let del = del
        .iter()
        .map(|key| format!("del map {map} {}", escape(key)));
    let set = set
        .iter()
        .map(|(key, value)| format!("set map {map} {} {}", escape(key), escape(value)));
    let add = add
        .iter()
        .map(|(key, value)| format!("add map {map} {} {}", escape(key), escape(value)));
    del.chain(set).chain(add).collect()
}

/// Adds, renews or removes one certificate of the TLS bind's crt-list (`map_dir/certs.list`),
/// named by its installed path (`map_dir/certs/NAME.pem`): the name a reload loads it under.
pub async fn change_cert(
    admin: &Path,
    map_dir: &Path,
    change: &CertChange,
) -> Result<(), RuntimeError> {
    let list = map_dir.join(CRT_LIST).display().to_string();
    let path = |name: &str| map_dir.join(cert_file(name)).display().to_string();
    match change {
        CertChange::Add { name, pem } => {
            let path = path(name);
            run_commands(admin, &[format!("new ssl cert {path}")]).await?;
            set_cert(admin, &path, pem).await?;
            run_commands(admin, &[format!("add ssl crt-list {list} {path}")]).await
        }
        CertChange::Update { name, pem } => set_cert(admin, &path(name), pem).await,
        CertChange::Remove { name } => {
            let path = path(name);
            run_commands(
                admin,
                &[
                    format!("del ssl crt-list {list} {path}"),
                    format!("del ssl cert {path}"),
                ],
            )
            .await
        }
    }
}

/// `set ssl cert` with the PEM as payload, then `commit ssl cert`: HAProxy swaps the
/// certificate for new handshakes; connections that run keep theirs.
async fn set_cert(admin: &Path, path: &str, pem: &str) -> Result<(), RuntimeError> {
    let command = format!("set severity-output number;set ssl cert {path}");
    let answer = cli_payload(admin, &command, pem).await?;
    check_answer(&command, &answer)?;
    if !answer.contains("Transaction created") && !answer.contains("Transaction updated") {
        return Err(RuntimeError::Answer { command, answer });
    }
    let commit = format!("set severity-output number;commit ssl cert {path}");
    let answer = cli_command(admin, &commit).await?;
    check_answer(&commit, &answer)?;
    if !answer.contains("Success!") {
        return Err(RuntimeError::Answer {
            command: commit,
            answer,
        });
    }
    Ok(())
}

/// Dumps the running servers' state to `path` for the next worker, without the servers whose
/// slot changes address (HAProxy would restore the old address over the new config's). A
/// failure only costs the state.
pub async fn save_server_state(admin: &Path, path: &Path, slots: &Slots) {
    match show_servers_state(admin, None).await {
        Ok(state) if state.starts_with('1') => {
            let kept = filter_server_state(&state, slots);
            if let Err(err) = write_atomic(path, &kept) {
                warn!(error = %err, "cannot save server state");
            }
        }
        Ok(other) => warn!(answer = %other.trim(), "unexpected server state answer"),
        Err(err) => warn!(error = %err, "cannot read server state"),
    }
}

/// Replaces a whole map atomically: `prepare map`, `add map @version` for every entry in
/// order (first match wins for `map_beg`/`map_end`), `commit map`.
pub async fn replace_map(
    admin: &Path,
    map: &Path,
    entries: &[(&str, &str)],
) -> Result<(), RuntimeError> {
    let map = map.display().to_string();
    let prepare = format!("prepare map {map}");
    let answer = cli_command(admin, &prepare).await?;
    let version = answer
        .trim()
        .strip_prefix("New version created:")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| RuntimeError::Answer {
            command: prepare.clone(),
            answer: answer.clone(),
        })?;
    let adds: Vec<String> = entries
        .iter()
        .map(|(key, value)| format!("add map @{version} {map} {} {}", escape(key), escape(value)))
        .collect();
    run_commands(admin, &adds).await?;
    run_commands(admin, &[format!("commit map @{version} {map}")]).await
}

/// One line of `show servers state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub backend: String,
    pub server: String,
    pub addr: String,
    pub port: u16,
}

/// Parses `show servers state` (format version 1): `be_id be_name srv_id srv_name srv_addr
/// ... srv_port (19th field) ...`. Returns the state lines and the text of each.
pub fn parse_servers_state(answer: &str) -> Vec<(ServerState, &str)> {
    answer
        .lines()
        .filter(|line| !line.starts_with('#') && line.split_whitespace().count() > 18)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((
                ServerState {
                    backend: fields[1].to_string(),
                    server: fields[3].to_string(),
                    addr: fields[4].to_string(),
                    port: fields[18].parse().ok()?,
                },
                line,
            ))
        })
        .collect()
}

/// `show servers state`, whole or of one backend.
pub async fn show_servers_state(admin: &Path, backend: Option<&str>) -> Result<String, CliError> {
    match backend {
        Some(backend) => cli_command(admin, &format!("show servers state {backend}")).await,
        None => cli_command(admin, "show servers state").await,
    }
}

/// Confirms that every server of `expected` (backend -> server -> address) runs there.
pub async fn verify_servers(
    admin: &Path,
    expected: &BTreeMap<String, BTreeMap<String, SocketAddr>>,
) -> Result<(), RuntimeError> {
    for (backend, servers) in expected {
        let answer = show_servers_state(admin, Some(backend)).await?;
        let running: BTreeMap<String, ServerState> = parse_servers_state(&answer)
            .into_iter()
            .map(|(state, _)| (state.server.clone(), state))
            .collect();
        for (server, addr) in servers {
            let actual = running
                .get(server)
                .map(|s| format!("{}:{}", s.addr, s.port))
                .unwrap_or_else(|| "nothing".into());
            if actual != addr.to_string() {
                return Err(RuntimeError::Mismatch {
                    backend: backend.clone(),
                    server: server.clone(),
                    actual,
                    expected: addr.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert!(check_answer("x", "\n\n\n").is_ok());
        assert!(check_answer(
            "x",
            "\n[4]: no need to change the addr, port changed from '1' to '18182' by 'stats socket command'\n\n"
        )
        .is_ok());
        assert!(check_answer("x", "\n[3]: No such server.\n\n").is_err());
        assert!(
            check_answer("x", "[4]: Invalid addr '1.2.3' by 'stats socket command'\n").is_err()
        );
        assert!(check_answer(
            "x",
            "Unknown command. Please enter one of the following commands only"
        )
        .is_err());
    }

    #[test]
    fn escapes_separators() {
        assert_eq!(escape("a.example.com/x;y/"), "a.example.com/x\\;y/");
    }

    #[test]
    fn parses_state_lines() {
        let answer = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n3 be_x 1 s1 127.0.0.1 2 4 1 1 3 15 3 4 6 0 0 0 - 18182 - 0 0 - - 0\n3 be_x 2 s2 127.0.0.1 0 5 1 1 5 1 0 0 14 0 0 0 - 1 - 0 0 - - 0\n\n";
        let states = parse_servers_state(answer);
        assert_eq!(states.len(), 2);
        assert_eq!(
            states[0].0,
            ServerState {
                backend: "be_x".into(),
                server: "s1".into(),
                addr: "127.0.0.1".into(),
                port: 18182
            }
        );
    }
}
