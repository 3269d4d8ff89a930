//! weft's default certificate for the TLS bind: self-signed, for the name "weft default", made
//! once and kept in run_dir (`tls-default.pem`), so that every restart and reload serves the
//! same one.
//!
//! HAProxy serves it to a client that sends no SNI, or a name no certificate covers: it
//! reveals no real hostname (serving one of the operator's certificates there would), and it
//! makes the TLS bind valid with no certificate at all (HAProxy refuses an `ssl` bind without
//! one). It is first in the crt-list, where HAProxy never lets it be removed at runtime.

use std::path::Path;

use tracing::{info, warn};

use crate::model::certs::validate;
use crate::render::DEFAULT_CERT;

/// The name the default certificate is issued to: not a hostname, so no SNI ever selects it.
pub const DEFAULT_CERT_NAME: &str = "weft default";

#[derive(Debug, thiserror::Error)]
#[error("cannot make the default certificate: {0}")]
pub struct DefaultCertError(#[from] rcgen::Error);

/// A new self-signed certificate and key for [`DEFAULT_CERT_NAME`], as PEM (rcgen's default:
/// ECDSA P-256, valid until 4096).
pub fn generate_default() -> Result<String, DefaultCertError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEFAULT_CERT_NAME);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

/// The default certificate `run_dir` holds, if it is a usable one, else a new one (which the
/// next install writes there).
pub fn default_certificate(run_dir: &Path) -> Result<String, DefaultCertError> {
    let path = run_dir.join(DEFAULT_CERT);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // A regular file of a certificate's size at most (weft writes it there itself).
    match crate::sources::read_own_file(&path, crate::model::certs::MAX_CERT_BYTES as u64) {
        Ok(bytes) => match validate("tls-default", &bytes, now) {
            Ok(cert) => return Ok(cert.pem),
            Err(reason) => {
                warn!(path = %path.display(), %reason, "the default certificate is not usable, making a new one")
            }
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            info!(path = %path.display(), "making weft's default certificate");
        }
        Err(err) => {
            warn!(path = %path.display(), error = %err, "cannot read the default certificate, making a new one")
        }
    }
    generate_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_made_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = default_certificate(dir.path()).unwrap();
        let cert = validate("tls-default", first.as_bytes(), 1_800_000_000).unwrap();
        assert_eq!(cert.sans, ["weft default"]);
        std::fs::write(dir.path().join(DEFAULT_CERT), &first).unwrap();
        assert_eq!(default_certificate(dir.path()).unwrap(), cert.pem);
        std::fs::write(dir.path().join(DEFAULT_CERT), "garbage").unwrap();
        assert_ne!(default_certificate(dir.path()).unwrap(), cert.pem);
    }

    #[test]
    fn a_fifo_in_its_place_is_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().to_path_buf();
        let made = crate::sources::read_beside_a_fifo(&dir.path().join(DEFAULT_CERT), move || {
            default_certificate(&run_dir).unwrap()
        });
        let cert = validate("tls-default", made.as_bytes(), 1_800_000_000).unwrap();
        assert_eq!(cert.sans, ["weft default"]);
    }
}
