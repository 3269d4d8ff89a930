//! Pebble, Let's Encrypt's test CA (Debian's `pebble` 2.4.0: `/usr/bin/pebble` and
//! `/usr/bin/pebble-challtestsrv`), inside a network namespace the test made, for real ACME
//! (RFC 8555) flows. Dropping a [`Pebble`] stops both processes and removes its directory, also
//! when the test panics.
//!
//! ```text
//!  ns (e.g. the hub, 192.168.150.1):
//!    pebble               https://IP:14000/dir (ACME), https://IP:15000 (management)
//!    pebble-challtestsrv  DNS on IP:8053 (UDP and TCP), management http://IP:8055
//! ```
//!
//! What Pebble 2.4.0 does, from its source (github.com/letsencrypt/pebble, tag v2.4.0):
//!
//! - The VA (`va/va.go`) resolves a name through `-dnsserver` by asking AAAA first, then A, and
//!   dials only the first address of that list (`addrs[0]`), for each of its three concurrent
//!   validations of a challenge (`concurrentValidations = 3`: the edge sees three requests).
//!   challtestsrv answers AAAA with `::1` unless told otherwise, so it runs here with
//!   `-defaultIPv6 ""`: the VA then dials the first A record, in the order [`Pebble::set_a`]
//!   gave them. To send validation to one chosen edge, give that edge's address first (or
//!   alone).
//! - The HTTP-01 request is `GET http://HOST:PORT/.well-known/acme-challenge/TOKEN` with
//!   `Host: HOST:PORT` (the port is always there, `:80` included: Go keeps the URL's) and
//!   `User-Agent: LetsEncrypt-Pebble-VA (linux; amd64)`; redirects are followed (each new
//!   connection resolved the same way). A name that does not resolve fails the challenge with
//!   `urn:ietf:params:acme:error:connection` ("could not resolve URL").
//! - Nothing in Pebble's log or management API names the address a validation went to: see
//!   [`Pebble::validation_address`].
//! - Certificates are valid from issuance for `certificateValidityPeriod` seconds (config,
//!   default 157766400 = 5 years) minus one second, unless the order asked for `notAfter`
//!   (RFC 8555 newOrder field, honoured as given).
//! - The issuing chain (root and intermediate, new keys) is made at every start and lives only in
//!   memory, like accounts, orders and authorizations: a restart forgets them all.

use std::collections::HashMap;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use nix::sched::CloneFlags;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::netns::{wait_until, Netns, NsProcess};

pub const PEBBLE: &str = "/usr/bin/pebble";
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// How Pebble runs. `PebbleOptions::default()` is the hub of `tests/edges.rs`: Pebble on
/// 192.168.150.1, validating HTTP-01 on port 80, no nonce rejections, no authorization reuse,
/// five-year certificates, and no default A record.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// An address of the namespace: every listener of Pebble and challtestsrv binds it.
    pub listen: Ipv4Addr,
    /// The ACME server (`listenAddress`): the directory is `https://listen:acme_port/dir`.
    pub acme_port: u16,
    /// Pebble's management interface (`managementListenAddress`): `/roots/0`,
    /// `/intermediates/0`, `/cert-status-by-serial/SERIAL`.
    pub management_port: u16,
    /// The port the VA fetches HTTP-01 challenges from (`httpPort`).
    pub http_port: u16,
    /// The port the VA connects to for TLS-ALPN-01 (`tlsPort`).
    pub tls_port: u16,
    /// challtestsrv's mock DNS (`-dns01`), Pebble's `-dnsserver`.
    pub dns_port: u16,
    /// challtestsrv's management interface (`-management`): `/add-a`, `/clear-a`, ...
    pub challtestsrv_port: u16,
    /// The A record of every name without records of its own (`-defaultIPv4`); `None`: no
    /// answer, so a validation of a name nobody set fails ("could not resolve").
    pub default_ipv4: Option<Ipv4Addr>,
    /// `PEBBLE_WFE_NONCEREJECT`: the percentage of good nonces Pebble rejects as bad (a
    /// correct client retries on `badNonce`). `Some(0)` (default): never; `None`: Pebble's own
    /// default, 5%.
    pub nonce_reject: Option<u8>,
    /// `PEBBLE_AUTHZREUSE`: how often (percent) an order reuses a valid authorization of the
    /// same account for the same name instead of asking for a new validation. Pebble's default
    /// is 50; here 0 (default), which in 2.4.0 still reuses one time in a hundred (it creates a
    /// new one when `rand.Intn(100) > percent`): a test that must see every order validated
    /// uses a new account per order.
    pub authz_reuse: u8,
    /// `certificateValidityPeriod` (whole seconds, at least one): how long issued certificates
    /// are valid. `None`: Pebble's default, 5 years.
    pub cert_validity: Option<Duration>,
    /// `PEBBLE_VA_ALWAYS_VALID=1`: every challenge passes without a request. Never in a test
    /// that means to prove HTTP-01.
    pub always_valid: bool,
}

impl Default for PebbleOptions {
    fn default() -> Self {
        PebbleOptions {
            listen: Ipv4Addr::new(192, 168, 150, 1),
            acme_port: 14000,
            management_port: 15000,
            http_port: 80,
            tls_port: 443,
            dns_port: 8053,
            challtestsrv_port: 8055,
            default_ipv4: None,
            nonce_reject: Some(0),
            authz_reuse: 0,
            cert_validity: None,
            always_valid: false,
        }
    }
}

/// Pebble's issuing chain of one run (it changes at every start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuingCa {
    /// `GET /roots/0`: the root certificate, PEM.
    pub root: String,
    /// `GET /intermediates/0`: the intermediate that signs the certificates, PEM. An order's
    /// certificate URL serves the leaf, then this; never the root.
    pub intermediate: String,
}

/// An HTTP-01 validation request the VA logged, from `Attempting to validate w/ HTTP: URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http01Attempt {
    pub url: String,
    /// The identifier (the URL's host, without the port).
    pub host: String,
    pub port: u16,
    pub token: String,
}

/// Pebble and challtestsrv in a namespace; see the top of this file.
pub struct Pebble {
    /// Declared before the directory: stopped before it goes. `None` while stopped.
    pebble: Option<NsProcess>,
    challtestsrv: NsProcess,
    netns: String,
    options: PebbleOptions,
    /// The CA of Pebble's own HTTPS listeners (not of the certificates it issues).
    ca_pem: String,
    /// Pebble's starts so far: run N logs to `pebble-N.log`.
    runs: usize,
    /// The A records set through [`set_a`](Self::set_a), in order, by host (lowercase, without
    /// the trailing dot).
    records: Mutex<HashMap<String, Vec<Ipv4Addr>>>,
    dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts challtestsrv and Pebble inside `ns` (which must hold `options.listen`) and waits
    /// until challtestsrv's management interface and Pebble's directory answer.
    pub fn start(ns: &Netns, options: PebbleOptions) -> Pebble {
        require_pebble();
        let dir = tempfile::Builder::new()
            .prefix(&format!("pebble-{}-", ns.name))
            .tempdir()
            .unwrap();
        let ip = options.listen;

        // A CA of the test for Pebble's own HTTPS (Debian ships no certificate for it).
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "weft test CA for Pebble's listener");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![ip.to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(
            dir.path().join("pebble-config.json"),
            config_json(&options, dir.path()),
        )
        .unwrap();

        let mut command = ns.exec(CHALLTESTSRV);
        command
            .arg("-management")
            .arg(format!("{ip}:{}", options.challtestsrv_port))
            .arg("-dns01")
            .arg(format!("{ip}:{}", options.dns_port))
            .arg("-defaultIPv4")
            .arg(
                options
                    .default_ipv4
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            )
            // Without this, every AAAA query gets ::1, which the VA would dial first.
            .args(["-defaultIPv6", ""])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""]);
        let challtestsrv = NsProcess::spawn(&mut command, dir.path().join("challtestsrv.log"));

        let mut pebble = Pebble {
            pebble: None,
            challtestsrv,
            netns: ns.name.clone(),
            options,
            ca_pem,
            runs: 0,
            records: Mutex::new(HashMap::new()),
            dir,
        };
        wait_until(
            Duration::from_secs(10),
            "pebble-challtestsrv's management interface answers",
            || {
                let log = pebble.challtestsrv.log();
                assert!(
                    !log.contains("address already in use"),
                    "pebble-challtestsrv could not listen:\n{log}"
                );
                // A harmless call: removes the records of a name nobody uses.
                pebble.challtestsrv_post("/clear-a", r#"{"host": "ready.invalid"}"#)
            },
        );
        pebble.start_again();
        pebble
    }

    /// Starts Pebble again after [`stop`](Self::stop) ([`Pebble::start`] calls it for the first
    /// run), on the same config and listener certificate, and waits until its directory
    /// answers. It remembers nothing of the previous run: a new issuing chain, no accounts,
    /// orders or authorizations. challtestsrv and its records stay as they were.
    pub fn start_again(&mut self) {
        assert!(self.pebble.is_none(), "Pebble already runs");
        self.runs += 1;
        let ip = self.options.listen;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, PEBBLE])
            .arg("-config")
            .arg(self.dir.path().join("pebble-config.json"))
            .arg("-dnsserver")
            .arg(format!("{ip}:{}", self.options.dns_port));
        // Only what the options say: nothing from the test's own environment.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PEBBLE_") {
                command.env_remove(name);
            }
        }
        command
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", self.options.authz_reuse.to_string());
        if let Some(percent) = self.options.nonce_reject {
            command.env("PEBBLE_WFE_NONCEREJECT", percent.to_string());
        }
        if self.options.always_valid {
            command.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let log = self.dir.path().join(format!("pebble-{}.log", self.runs));
        self.pebble = Some(NsProcess::spawn(&mut command, log));
        let url = self.directory_url();
        wait_until(
            Duration::from_secs(10),
            "Pebble's directory answers",
            || {
                let log = self.log();
                // FailOnError: Pebble exits after printing what failed.
                assert!(
                    !log.contains("Calling ListenAndServeTLS()") && !log.contains("Reading JSON"),
                    "Pebble exited as it started:\n{log}"
                );
                match self.https("GET", &url, None)? {
                    (200, body) if body.contains("newOrder") => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        );
    }

    /// Stops Pebble (SIGTERM, which ends it at once: 2.4.0 catches no signal), as a CA that is
    /// down; challtestsrv keeps running.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.pebble.take() {
            process.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.pebble.is_some()
    }

    pub fn options(&self) -> &PebbleOptions {
        &self.options
    }

    /// `https://IP:14000/dir`.
    pub fn directory_url(&self) -> String {
        format!(
            "https://{}:{}/dir",
            self.options.listen, self.options.acme_port
        )
    }

    /// `https://IP:15000`: Pebble's management interface.
    pub fn management_url(&self) -> String {
        format!(
            "https://{}:{}",
            self.options.listen, self.options.management_port
        )
    }

    /// The CA (PEM) a client trusts to talk to Pebble's ACME and management listeners. The
    /// same for the whole life of this value, restarts included.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// [`ca_pem`](Self::ca_pem) as a file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// This run's issuing chain, from the management interface; different after every start.
    pub fn issuing_roots(&self) -> IssuingCa {
        let get =
            |path: &str| match self.https("GET", &format!("{}{path}", self.management_url()), None)
            {
                Ok((200, pem)) if pem.contains("-----BEGIN CERTIFICATE-----") => pem,
                other => panic!("GET {path} on Pebble's management interface: {other:?}"),
            };
        IssuingCa {
            root: get("/roots/0"),
            intermediate: get("/intermediates/0"),
        }
    }

    /// Makes `host` resolve to `addresses`, in this order, replacing what it resolved to
    /// before (challtestsrv's `/add-a` appends, so `/clear-a` goes first). The VA dials the
    /// first of them.
    pub fn set_a(&self, host: &str, addresses: &[Ipv4Addr]) {
        assert!(!addresses.is_empty(), "set_a({host:?}) with no address");
        self.clear_a(host);
        let body = serde_json::json!({
            "host": record_key(host),
            "addresses": addresses.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>(),
        });
        self.challtestsrv_post("/add-a", &body.to_string())
            .unwrap_or_else(|e| panic!("challtestsrv /add-a {body}: {e}"));
        self.records
            .lock()
            .unwrap()
            .insert(record_key(host), addresses.to_vec());
    }

    /// Removes the A records of `host`: it resolves to the default IPv4 again, if any.
    pub fn clear_a(&self, host: &str) {
        let body = serde_json::json!({ "host": record_key(host) });
        self.challtestsrv_post("/clear-a", &body.to_string())
            .unwrap_or_else(|e| panic!("challtestsrv /clear-a {body}: {e}"));
        self.records.lock().unwrap().remove(&record_key(host));
    }

    /// The address the VA connects to when it validates `host` by HTTP-01 (or TLS-ALPN-01):
    /// the first A record [`set_a`](Self::set_a) gave it, else the default IPv4, else none (the
    /// validation fails). Pebble logs only the URL it fetches (`http://HOST:80/...`), never the
    /// address it dialed, and its management API has nothing about validations: this follows
    /// from `va/va.go` (`resolveIP`: AAAA answers, then A answers, in the order challtestsrv
    /// gives them; `DialContext` dials `addrs[0]`) with AAAA answers off (`-defaultIPv6 ""`).
    /// Confirm on the serving side when it matters: the requests carry
    /// `User-Agent: LetsEncrypt-Pebble-VA (linux; amd64)`.
    pub fn validation_address(&self, host: &str) -> Option<Ipv4Addr> {
        match self.records.lock().unwrap().get(&record_key(host)) {
            Some(addresses) => addresses.first().copied(),
            None => self.options.default_ipv4,
        }
    }

    /// What challtestsrv's DNS answers to `host A`, asked with `dig` from inside the namespace
    /// (as Pebble asks it); `None` when `dig` (package dnsutils) is not installed.
    pub fn resolve_a(&self, host: &str) -> Option<Vec<Ipv4Addr>> {
        Command::new("dig").arg("-v").output().ok()?;
        let output = Command::new("ip")
            .args(["netns", "exec", &self.netns, "dig"])
            .arg(format!("@{}", self.options.listen))
            .args(["-p", &self.options.dns_port.to_string()])
            .args(["+short", "+tries=1", "+time=2", host, "A"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "dig {host} A: {}",
            super::netns::text(&output)
        );
        Some(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(|line| {
                    line.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("dig {host} A answered {line:?}: {e}"))
                })
                .collect(),
        )
    }

    /// The log of Pebble's current (or last) run.
    pub fn log(&self) -> String {
        self.run_log(self.runs)
    }

    /// The logs of every run of Pebble, oldest first.
    pub fn logs(&self) -> String {
        (1..=self.runs).map(|run| self.run_log(run)).collect()
    }

    /// challtestsrv's log.
    pub fn challtestsrv_log(&self) -> String {
        self.challtestsrv.log()
    }

    fn run_log(&self, run: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("pebble-{run}.log")))
            .unwrap_or_default()
    }

    /// The IDs of the orders Pebble accepted (`newOrder`), over every run, oldest first: the
    /// `Added order "ID" to the db` lines (`wfe/wfe.go`, NewOrder). A newOrder refused before
    /// that (bad nonce, malformed, unknown account) is not there.
    pub fn orders(&self) -> Vec<String> {
        lines_after(&self.logs(), "Added order \"")
            .map(|rest| rest.split('"').next().unwrap_or_default().to_string())
            .collect()
    }

    /// How many accounts Pebble created, over every run: the `There are now N accounts in
    /// memory` lines (`wfe/wfe.go`, NewAccount; a lookup of an existing key logs nothing).
    pub fn accounts_created(&self) -> usize {
        lines_after(&self.logs(), "accounts in memory").count()
    }

    /// The HTTP-01 requests the VA made, over every run: the `Attempting to validate w/ HTTP:
    /// URL` lines (`va/va.go`, fetchHTTP), three per challenge (one per concurrent
    /// validation), logged before the name is resolved: also when it does not resolve and no
    /// request leaves. The URL names the identifier and the port, not the address dialed (see
    /// [`validation_address`](Self::validation_address)).
    pub fn http01_attempts(&self) -> Vec<Http01Attempt> {
        lines_after(&self.logs(), "Attempting to validate w/ HTTP: ")
            .filter_map(|url| {
                let url = url.trim();
                let rest = url.strip_prefix("http://")?;
                let (authority, path) = rest.split_once('/')?;
                let (host, port) = authority.rsplit_once(':')?;
                Some(Http01Attempt {
                    url: url.to_string(),
                    host: host.trim_matches(['[', ']']).to_string(),
                    port: port.parse().ok()?,
                    token: path
                        .strip_prefix(".well-known/acme-challenge/")?
                        .to_string(),
                })
            })
            .collect()
    }

    /// The outcome of each challenge the VA completed, over every run: (authorization ID,
    /// valid), from `authz ID set VALID by completed challenge CHALLENGE` and `... set INVALID
    /// ...` (`va/va.go`, process).
    pub fn validations(&self) -> Vec<(String, bool)> {
        lines_after(&self.logs(), "authz ")
            .filter_map(|rest| {
                let (id, outcome) = rest.split_once(' ')?;
                if outcome.starts_with("set VALID by completed challenge") {
                    Some((id.to_string(), true))
                } else if outcome.starts_with("set INVALID by completed challenge") {
                    Some((id.to_string(), false))
                } else {
                    None
                }
            })
            .collect()
    }

    /// (serial in hex, order ID) of each certificate Pebble issued, over every run: the
    /// `Issued certificate serial SERIAL for order ORDER` lines (`ca/ca.go`, CompleteOrder).
    pub fn issued(&self) -> Vec<(String, String)> {
        lines_after(&self.logs(), "Issued certificate serial ")
            .filter_map(|rest| {
                let (serial, order) = rest.split_once(" for order ")?;
                Some((serial.to_string(), order.trim().to_string()))
            })
            .collect()
    }

    /// One request from inside the namespace to Pebble (trusting [`ca_pem`](Self::ca_pem)) or
    /// challtestsrv: status and body.
    pub fn https(
        &self,
        method: &str,
        url: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        request_in(
            &self.netns,
            Some(self.ca_pem.clone()),
            method,
            url,
            body.map(str::to_string),
        )
    }

    /// A POST of `body` (JSON) to challtestsrv's management interface; `Ok` on 200.
    pub fn challtestsrv_post(&self, path: &str, body: &str) -> Result<(), String> {
        let url = format!(
            "http://{}:{}{path}",
            self.options.listen, self.options.challtestsrv_port
        );
        match request_in(&self.netns, None, "POST", &url, Some(body.to_string()))? {
            (200, _) => Ok(()),
            other => Err(format!("POST {url}: {other:?}")),
        }
    }
}

/// Fails the test, saying what is missing, unless Debian's Pebble is installed.
pub fn require_pebble() {
    for binary in [PEBBLE, CHALLTESTSRV] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: the ACME tests run Pebble 2.4 (apt-get install pebble; \
             .ci/run installs it)"
        );
    }
}

/// Pebble 2.4.0's config (`cmd/pebble/main.go`, `type config`; Go matches the keys without
/// regard to case).
fn config_json(options: &PebbleOptions, dir: &Path) -> String {
    let ip = options.listen;
    let mut pebble = serde_json::json!({
        "listenAddress": format!("{ip}:{}", options.acme_port),
        "managementListenAddress": format!("{ip}:{}", options.management_port),
        "certificate": dir.join("cert.pem"),
        "privateKey": dir.join("key.pem"),
        "httpPort": options.http_port,
        "tlsPort": options.tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    });
    if let Some(validity) = options.cert_validity {
        assert!(
            validity.as_secs() >= 1,
            "certificateValidityPeriod is whole seconds, at least one (0 means the default)"
        );
        pebble["certificateValidityPeriod"] = validity.as_secs().into();
    }
    serde_json::json!({ "pebble": pebble }).to_string()
}

/// The name as challtestsrv is told it and as the VA asks it: lowercase (Pebble lowercases the
/// names of an order; challtestsrv matches names exactly, after adding the trailing dot).
fn record_key(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// What follows `marker` on each line of `log` that holds it.
fn lines_after<'a>(log: &'a str, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    log.lines()
        .filter_map(move |line| line.split_once(marker).map(|(_, rest)| rest))
}

/// One HTTP request on a fresh client, from a thread inside namespace `netns`; HTTPS trusts
/// only `ca` (PEM). At most 5 s (scaled by `WEFT_TEST_PATIENCE`).
fn request_in(
    netns: &str,
    ca: Option<String>,
    method: &str,
    url: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let path = PathBuf::from("/run/netns").join(netns);
    let (method, url) = (method.to_string(), url.to_string());
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", path.display()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let mut client = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .timeout(super::patience(Duration::from_secs(5)));
            if let Some(ca) = ca {
                client = client.tls_built_in_root_certs(false).add_root_certificate(
                    reqwest::Certificate::from_pem(ca.as_bytes()).map_err(|e| e.to_string())?,
                );
            }
            let client = client.build().map_err(|e| e.to_string())?;
            let method =
                reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
            let mut request = client.request(method, &url);
            if let Some(body) = body {
                request = request
                    .header("Content-Type", "application/json")
                    .body(body);
            }
            let response = request.send().await.map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            let text = response.text().await.map_err(|e| e.to_string())?;
            Ok((status, text))
        })
    })
    .join()
    .map_err(|_| "the client thread panicked".to_string())?
}
