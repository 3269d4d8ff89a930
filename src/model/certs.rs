//! TLS certificates as the routing table holds them: each PEM file of `tls.certs` validated
//! once, here, before it goes near HAProxy.
//!
//! ```text
//! file bytes ──PEM──> certificates (leaf first) + one private key
//!                       │ leaf parses as X.509, valid now (not before / not after)
//!                       │ the key is one rustls can sign with, and its public key is the leaf's
//!                       v
//!            Certificate { name, SANs, not after, PEM re-encoded: certificates, then the key }
//! ```
//!
//! What fails is dropped with a reason; every other certificate keeps serving. The PEM HAProxy
//! gets is re-encoded from what was parsed: no text between blocks and no empty line, which
//! would end a payload on HAProxy's CLI.

use std::collections::BTreeMap;

use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The most certificate files read from `tls.certs`; the rest are dropped with the reason.
pub const MAX_CERT_FILES: usize = 1000;
/// The most bytes of one certificate file (a leaf, a chain of a few intermediates and a key
/// take 3-10 KiB); a bigger file is dropped with the reason.
pub const MAX_CERT_BYTES: usize = 128 * 1024;
/// The longest certificate file name, `.pem` included.
pub const MAX_CERT_NAME: usize = 128;

/// One certificate HAProxy serves, by SNI for the names in its SAN list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The file's name without `.pem`: `[A-Za-z0-9._-]`, safe in HAProxy's CLI and crt-list.
    pub name: String,
    /// DNS names of the leaf's subjectAltName extension (its CN when it has none).
    pub sans: Vec<String>,
    /// Unix seconds of the leaf's notAfter.
    pub not_after: i64,
    /// Hex serial number of the leaf.
    pub serial: String,
    /// Certificates (leaf first), then the key, as PEM without empty lines.
    pub pem: String,
}

/// The certificates that passed validation, by name.
pub type Certificates = BTreeMap<String, Certificate>;

/// Where an ACME CA fetches an HTTP-01 challenge's key authorization: this path + the token.
pub const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// Pending ACME HTTP-01 challenges: token -> key authorization (`token.thumbprint`), each
/// checked by [`check_challenge`].
pub type Challenges = BTreeMap<String, String>;

/// The longest token or key authorization taken (RFC 8555 tokens carry 128 bits or more of
/// base64url, 22+ characters; Let's Encrypt's are 43, a key authorization 87).
pub const MAX_CHALLENGE_LEN: usize = 256;

/// Why a challenge cannot go into HAProxy's map, if it cannot: a token is base64url (RFC 8555
/// 8.3), a key authorization `token.thumbprint` of the same token; nothing else ever reaches
/// the map file or the CLI.
pub fn check_challenge(token: &str, key_authorization: &str) -> Result<(), String> {
    let base64url = |text: &str| {
        !text.is_empty()
            && text.len() <= MAX_CHALLENGE_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !base64url(token) {
        return Err("the token is not base64url of at most 256 characters".into());
    }
    match key_authorization.split_once('.') {
        Some((of, thumbprint)) if of == token && base64url(thumbprint) => Ok(()),
        _ => Err("the key authorization is not `token.thumbprint` of this token".into()),
    }
}

/// Whether a certificate of `certs` serves `host` by SNI: a SAN equal to it, or a wildcard
/// SAN `*.example.com` for a host one label under it (`shop.example.com`). A wildcard host
/// (`*.example.com`) is covered by the same wildcard only.
pub fn covers(certs: &Certificates, host: &str) -> bool {
    let wildcard_of = |host: &str| {
        host.split_once('.')
            .map(|(_, parent)| format!("*.{parent}"))
    };
    certs.values().any(|cert| {
        cert.sans.iter().any(|san| {
            san == host || (!host.starts_with('*') && wildcard_of(host).as_deref() == Some(san))
        })
    })
}

/// The certificate name of a file name: `shop.pem` -> `shop`; `None` for a file weft does not
/// read as a certificate (another extension, or hidden: `..data`, an editor's swap file).
pub fn cert_name(file_name: &str) -> Option<&str> {
    if file_name.starts_with('.') {
        return None;
    }
    file_name
        .strip_suffix(".pem")
        .filter(|name| !name.is_empty())
}

/// Why a certificate name cannot be used, if it cannot.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.len() + 4 > MAX_CERT_NAME {
        return Err(format!(
            "the file name is longer than {MAX_CERT_NAME} bytes"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the file name holds {c:?}; only letters, digits, '.', '_' and '-' are taken \
             (the name goes into HAProxy's crt-list and CLI)"
        ));
    }
    Ok(())
}

/// Validates one PEM file at unix time `now`: a file from `tls.certs`, a certificate from the
/// ACME store or one just issued, all the same way (at most [`MAX_CERT_BYTES`] among it).
pub fn validate(name: &str, bytes: &[u8], now: i64) -> Result<Certificate, String> {
    check_name(name)?;
    if bytes.len() > MAX_CERT_BYTES {
        return Err(format!(
            "larger than {} KiB: not a certificate with its chain and key",
            MAX_CERT_BYTES / 1024
        ));
    }
    let blocks = pem::parse_many(bytes).map_err(|err| format!("not PEM: {err}"))?;
    if blocks.is_empty() {
        return Err("not PEM: no -----BEGIN block".into());
    }
    let mut certs = Vec::new();
    let mut keys = Vec::new();
    let mut extra = Vec::new();
    for block in &blocks {
        match block.tag() {
            "CERTIFICATE" => certs.push(block),
            "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" => keys.push(block),
            // HAProxy reads these too: passed on as they are.
            "DH PARAMETERS" | "X509 CRL" => extra.push(block),
            other => {
                return Err(format!(
                    "holds a PEM block HAProxy does not take: {other:?}"
                ))
            }
        }
    }
    let Some(leaf_block) = certs.first() else {
        return Err("holds no certificate".into());
    };
    let key_block = match keys.as_slice() {
        [] => return Err("holds no private key".into()),
        [key] => *key,
        _ => return Err("holds more than one private key".into()),
    };
    let (_, leaf) = X509Certificate::from_der(leaf_block.contents())
        .map_err(|err| format!("the first certificate does not parse: {err}"))?;
    for (i, block) in certs.iter().enumerate().skip(1) {
        X509Certificate::from_der(block.contents())
            .map_err(|err| format!("chain certificate #{i} does not parse: {err}"))?;
    }
    let validity = leaf.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if now < not_before {
        return Err(format!(
            "not valid yet: valid from {} on",
            validity.not_before
        ));
    }
    if now > not_after {
        return Err(format!("expired on {}", validity.not_after));
    }
    let key = private_key(key_block)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| format!("the private key is not usable: {err}"))?;
    let public = signing
        .public_key()
        .ok_or("the private key's public key cannot be derived")?;
    if public.as_ref() != leaf.public_key().raw {
        return Err("the private key does not match the certificate".into());
    }
    let sans = names_of(&leaf);
    if sans.is_empty() {
        return Err("names no host: no DNS name in subjectAltName, no CN".into());
    }
    let serial = leaf.raw_serial_as_string().replace(':', "");
    // One block after the other: `encode_many` puts an empty line between them.
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let pem: String = certs
        .iter()
        .chain(&extra)
        .chain([&key_block])
        .map(|block| pem::encode_config(block, config))
        .collect();
    Ok(Certificate {
        name: name.to_string(),
        sans,
        not_after,
        serial,
        pem,
    })
}

fn private_key(block: &pem::Pem) -> Result<PrivateKeyDer<'static>, String> {
    let der = block.contents().to_vec();
    Ok(match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
        other => return Err(format!("{other:?} is no private key")),
    })
}

/// The DNS names HAProxy serves the certificate for: the SAN list, or the CN without one.
fn names_of(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed certificate for `hosts`, valid from `from` to `to` (unix seconds), with
    /// its key: `(certificate PEM, key PEM)`.
    pub(crate) fn self_signed(hosts: &[&str], from: i64, to: i64) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    /// The bound holds wherever the certificate comes from (the ACME store's are validated
    /// here too): a good certificate padded past it is refused.
    #[test]
    fn a_certificate_larger_than_the_bound_is_refused() {
        let (cert, key) = self_signed(&["shop.example.com"], NOW - DAY, NOW + DAY);
        let good = format!("{cert}\n{key}\n");
        assert!(validate("shop", good.as_bytes(), NOW).is_ok());
        let padded = format!("{}{good}", "#\n".repeat(MAX_CERT_BYTES / 2));
        let err = validate("shop", padded.as_bytes(), NOW).unwrap_err();
        assert_eq!(
            err,
            "larger than 128 KiB: not a certificate with its chain and key"
        );
    }

    #[test]
    fn a_good_pem_gives_its_names_and_expiry_and_no_empty_line() {
        let (cert, key) = self_signed(
            &["Shop.example.com", "*.shop.example.com"],
            NOW - DAY,
            NOW + DAY,
        );
        let text = format!("# comment\n{cert}\n\n{key}\n");
        let got = validate("shop", text.as_bytes(), NOW).unwrap();
        assert_eq!(got.sans, ["*.shop.example.com", "shop.example.com"]);
        assert_eq!(got.not_after, NOW + DAY);
        assert!(
            !got.pem.contains("\n\n") && !got.pem.contains('#'),
            "{}",
            got.pem
        );
        assert!(got.pem.find("CERTIFICATE").unwrap() < got.pem.find("PRIVATE KEY").unwrap());
        // Key first in the file is fine too.
        let reversed = format!("{key}{cert}");
        assert_eq!(
            validate("shop", reversed.as_bytes(), NOW).unwrap().pem,
            got.pem
        );
    }

    #[test]
    fn each_broken_pem_says_why() {
        let (cert, key) = self_signed(&["a.test"], NOW - DAY, NOW + DAY);
        let (_, other_key) = self_signed(&["a.test"], NOW - DAY, NOW + DAY);
        let (old, old_key) = self_signed(&["a.test"], NOW - 2 * DAY, NOW - DAY);
        let (young, young_key) = self_signed(&["a.test"], NOW + DAY, NOW + 2 * DAY);
        let reason = |name: &str, text: String| validate(name, text.as_bytes(), NOW).unwrap_err();
        assert!(reason("a", "garbage".into()).starts_with("not PEM"));
        assert_eq!(reason("a", cert.clone()), "holds no private key");
        assert_eq!(reason("a", key.clone()), "holds no certificate");
        assert_eq!(
            reason("a", format!("{cert}{other_key}")),
            "the private key does not match the certificate"
        );
        assert!(reason("a", format!("{old}{old_key}")).starts_with("expired on"));
        assert!(reason("a", format!("{young}{young_key}")).starts_with("not valid yet"));
        assert!(reason("a b", format!("{cert}{key}")).contains("only letters"));
        let broken = cert.replace("MII", "MIX");
        assert!(
            reason("a", format!("{broken}{key}")).contains("does not parse"),
            "{}",
            reason("a", format!("{broken}{key}"))
        );
    }

    #[test]
    fn names_of_files() {
        assert_eq!(cert_name("shop.pem"), Some("shop"));
        assert_eq!(cert_name("..data"), None);
        assert_eq!(cert_name(".shop.pem.swp"), None);
        assert_eq!(cert_name("shop.key"), None);
        assert_eq!(cert_name(".pem"), None);
    }
}
