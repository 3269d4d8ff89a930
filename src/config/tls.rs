//! `[tls]`: HTTPS on a second bind of the one frontend, certificates from a watched directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{absolute, haproxy_bind, Issues};

pub const DEFAULT_TLS_LISTEN: &str = "0.0.0.0:443";

/// `[tls]`. Absent: no TLS bind at all.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    /// Where HAProxy listens for TLS clients. Default `0.0.0.0:443`.
    listen: Option<String>,
    /// A directory of PEM files, each one certificate, its chain and its key (as HAProxy reads
    /// them); relative paths are relative to weft.toml's directory. Required.
    certs: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The watched certificate directory, absolute.
    pub certs: PathBuf,
}

/// `None` when `[tls]` is absent (`raw` is `None`).
pub(super) fn validate_tls(
    raw: Option<RawTls>,
    base: &Path,
    issues: &mut Issues,
) -> Option<TlsConfig> {
    let raw = raw?;
    let listen = haproxy_bind(raw.listen, DEFAULT_TLS_LISTEN, "tls.listen", issues);
    let Some(certs) = raw.certs else {
        issues.add("tls.certs", "is required when [tls] is present");
        return None;
    };
    Some(TlsConfig {
        listen,
        certs: absolute(certs, base),
    })
}
