//! TLS test support: a test CA that issues certificates at test time (rcgen), what a TLS bind
//! serves for a given SNI (`openssl s_client`), and HTTPS requests (`curl`, HTTP/2 by ALPN).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Fails the test, saying what is missing, when a command-line tool these tests use is not
/// installed.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    let found = found
        || Command::new(tool)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
    assert!(
        found,
        "{tool} is missing: the TLS tests use it (apt-get install {package})"
    );
}

/// A certificate authority for one test: clients trust its certificate (`ca.pem` in `dir`).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's file, for `curl --cacert`.
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

/// A certificate the test CA issued, with its key: the PEM a certificates' directory holds.
#[derive(Clone)]
pub struct Issued {
    /// Certificate, then key.
    pub pem: String,
    /// Hex serial, lowercase, as `/status` and [`Served`] give it.
    pub serial: String,
    pub cert: String,
    pub key: String,
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "weft test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, cert.pem()).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            file,
            _dir: dir,
        }
    }

    /// A certificate for `hosts`, valid from an hour ago for `days`.
    pub fn issue(&self, hosts: &[&str], days: i64) -> Issued {
        let now = unix_now();
        self.issue_between(hosts, now - 3600, now + days * 86_400)
    }

    /// A certificate for `hosts`, valid between the unix times `from` and `to`.
    pub fn issue_between(&self, hosts: &[&str], from: i64, to: i64) -> Issued {
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        Issued {
            pem: format!("{}{}", cert.pem(), key.serialize_pem()),
            serial: parsed.raw_serial_as_string().replace(':', ""),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `content` into the certificates' directory as `name` the way a renewal tool does:
/// a hidden temporary file renamed over it.
pub fn install(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The certificate a TLS bind served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub serial: String,
    /// The subject's CN.
    pub common_name: String,
    pub not_after: i64,
}

/// The certificate 127.0.0.1:`port` serves to a client sending `sni` (none: no SNI at all).
pub fn served(port: u16, sni: Option<&str>) -> Result<Served, String> {
    let mut command = Command::new("openssl");
    command
        .arg("s_client")
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"));
    match sni {
        Some(name) => command.arg("-servername").arg(name),
        None => command.arg("-noservername"),
    };
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("openssl s_client: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let pem = pem::parse(text.as_bytes()).map_err(|e| format!("no certificate served ({e})"))?;
    let (_, cert) = X509Certificate::from_der(pem.contents()).map_err(|e| e.to_string())?;
    let served = Served {
        serial: cert.raw_serial_as_string().replace(':', ""),
        common_name: cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .next()
            .unwrap_or_default()
            .to_string(),
        not_after: cert.validity().not_after.timestamp(),
    };
    Ok(served)
}

/// Waits until `sni` on `port` is served the certificate `serial`; returns how long it took.
pub async fn wait_for_serial(port: u16, sni: Option<&str>, serial: &str) -> Duration {
    let started = std::time::Instant::now();
    super::eventually(
        Duration::from_secs(5),
        &format!("{sni:?} served certificate {serial}"),
        || async {
            let got = served(port, sni)?;
            if got.serial == serial {
                Ok(())
            } else {
                Err(format!("served {got:?}"))
            }
        },
    )
    .await;
    started.elapsed()
}

/// `curl` for `https://HOST:PORT/PATH` resolved to 127.0.0.1, trusting `ca` (none: no
/// verification), over HTTP/2 when `http2`: `(status, HTTP version)` of each of `requests`
/// requests on one connection, or the error curl gave.
pub fn curl(
    port: u16,
    host: &str,
    ca: Option<&Path>,
    http2: bool,
    requests: usize,
) -> Result<Vec<(u16, String)>, String> {
    let url = format!("https://{host}:{port}/");
    let mut command = curl_to(port, host);
    command
        .arg("--write-out")
        .arg("%{http_code} %{http_version}\\n");
    match ca {
        Some(ca) => command.arg("--cacert").arg(ca),
        None => command.arg("--insecure"),
    };
    if http2 {
        command.arg("--http2");
    }
    // One connection for all of them; each body discarded (`--output` is per URL).
    for _ in 0..requests {
        command.arg(&url).arg("--output").arg("/dev/null");
    }
    let answers: Vec<(u16, String)> = run_curl(&mut command)?
        .lines()
        .filter_map(|line| {
            let (code, version) = line.split_once(' ')?;
            Some((code.parse().ok()?, version.to_string()))
        })
        .collect();
    if answers.len() != requests {
        return Err(format!("{requests} requests, {answers:?} answered"));
    }
    Ok(answers)
}

/// `curl` quiet but for errors, at most 10 s, `HOST:PORT` resolved to 127.0.0.1.
fn curl_to(port: u16, host: &str) -> Command {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10", "--resolve"])
        .arg(format!("{host}:{port}:127.0.0.1"))
        .stdin(Stdio::null());
    command
}

/// Runs `command`: its stdout, or its stderr as the error.
fn run_curl(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|e| format!("curl: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

/// The body of one HTTPS GET of `https://HOST:PORT/` (trusting `ca`).
pub fn curl_body(port: u16, host: &str, ca: &Path) -> Result<String, String> {
    run_curl(
        curl_to(port, host)
            .arg("--fail")
            .arg("--cacert")
            .arg(ca)
            .arg(format!("https://{host}:{port}/")),
    )
}

/// One GET of `scheme://HOST:PORT/PATH` resolved to 127.0.0.1 (`https`: trusting `ca`),
/// following no redirect: the status and the response headers, names lowercased.
pub fn curl_headers(
    scheme: &str,
    port: u16,
    host: &str,
    path: &str,
    ca: &Path,
) -> Result<(u16, Vec<(String, String)>), String> {
    let text = run_curl(
        curl_to(port, host)
            .arg("--cacert")
            .arg(ca)
            .args(["--output", "/dev/null", "--dump-header", "-"])
            .arg(format!("{scheme}://{host}:{port}{path}")),
    )?;
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Ok((status, headers))
}
