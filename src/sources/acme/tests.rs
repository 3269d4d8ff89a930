use std::path::Path;

use super::*;
use crate::config::{AcmeStore, Config};
use crate::model::{test_table, ServiceDef};

fn acme(keys: &str) -> AcmeConfig {
    let text = format!(
        "[sources.file]\npath = \"s.toml\"\n[tls]\ncerts = \"certs\"\n[tls.acme]\n\
         directory = \"https://ca.test/dir\"\nemail = \"ops@example.com\"\n{keys}"
    );
    Config::parse(&text, Path::new("/etc/weft"))
        .unwrap()
        .acme()
        .unwrap()
        .clone()
}

fn issues(keys: &str) -> Vec<String> {
    let text =
        format!("[sources.file]\npath = \"s.toml\"\n[tls]\ncerts = \"certs\"\n[tls.acme]\n{keys}");
    match Config::parse(&text, Path::new("/etc/weft")) {
        Ok(_) => Vec::new(),
        Err(issues) => issues
            .into_iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect(),
    }
}

#[test]
fn the_config_takes_its_keys_and_refuses_bad_ones() {
    let config = acme("hosts = [\".Example.com\", \"shop.example.org\"]\nca_file = \"ca.pem\"\n");
    assert_eq!(config.hosts, [".example.com", "shop.example.org"]);
    assert_eq!(
        config.ca_file.as_deref(),
        Some(Path::new("/etc/weft/ca.pem"))
    );
    assert_eq!(config.store, AcmeStore::Local, "no Consul source: local");
    assert_eq!(config.renew_before, Duration::from_secs(30 * 24 * 3600));
    assert!(config.wants("a.example.com"));
    assert!(config.wants("shop.example.org"));
    assert!(
        !config.wants("example.com"),
        "a suffix matches subdomains only"
    );
    assert!(
        !config.wants("x.shop.example.org"),
        "a name matches itself only"
    );
    assert!(!config.wants("evilexample.com"));

    let refused = issues(
        "directory = \"http://ca.test/dir\"\nemail = \"not an address\"\n\
         hosts = [\"*.example.com\", \"a b\"]\nrenew_before = \"soon\"\nmax_orders = 0\n\
         store = \"consul\"\nlock_ttl = \"1s\"\n",
    );
    for key in [
        "tls.acme.directory",
        "tls.acme.email",
        "tls.acme.hosts",
        "tls.acme.renew_before",
        "tls.acme.max_orders",
        "tls.acme.store",
        "tls.acme.lock_ttl",
    ] {
        assert!(
            refused.iter().any(|i| i.starts_with(key)),
            "{key} in {refused:?}"
        );
    }
    let missing = issues("");
    assert!(missing.iter().any(|i| i.starts_with("tls.acme.directory")));
    assert!(missing.iter().any(|i| i.starts_with("tls.acme.email")));
    let credentials = issues("directory = \"https://u:p@ca.test/dir\"\nemail = \"a@b.example\"\n");
    assert!(credentials
        .iter()
        .any(|i| i.starts_with("tls.acme.directory")));
}

/// A certificate for `host`, from a throwaway CA, valid `days` from now.
fn pem_for(host: &str, days: i64) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
    let cert = params.self_signed(&key).unwrap();
    format!("{}{}", cert.pem(), key.serialize_pem())
}

fn built(hosts: &[&str]) -> Built {
    let defs = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| ServiceDef::new(&format!("svc{i}"), &[host], &["10.2.1.5:80"]))
        .collect();
    Built {
        table: std::sync::Arc::new(test_table(defs)),
        ..Built::default()
    }
}

#[test]
fn hosts_are_wanted_when_named_routed_not_wildcards_and_not_served_by_an_operators_certificate() {
    let config = acme("hosts = [\".example.com\"]\n");
    let mut built = built(&[
        "a.example.com",
        "b.example.com",
        "other.org",
        "*.example.com",
    ]);
    let now = unix_now();
    let operators = validate("b", pem_for("b.example.com", 90).as_bytes(), now).unwrap();
    std::sync::Arc::make_mut(&mut built.table)
        .certificates
        .insert("b".into(), operators);
    // An ACME certificate of a.example.com does not stop its renewal: it is not the operator's.
    let ours = validate(
        &cert_name("a.example.com"),
        pem_for("a.example.com", 90).as_bytes(),
        now,
    )
    .unwrap();
    std::sync::Arc::make_mut(&mut built.table)
        .certificates
        .insert(ours.name.clone(), ours);
    let wanted: Vec<String> = wanted_hosts(&config, &built, now).0.into_iter().collect();
    assert_eq!(wanted, ["a.example.com"]);
    // An operator's certificate inside the renewal window no longer counts.
    let expiring = validate("b", pem_for("b.example.com", 10).as_bytes(), now).unwrap();
    std::sync::Arc::make_mut(&mut built.table)
        .certificates
        .insert("b".into(), expiring);
    let wanted: Vec<String> = wanted_hosts(&config, &built, now).0.into_iter().collect();
    assert_eq!(wanted, ["a.example.com", "b.example.com"]);
}

#[test]
fn a_guest_adding_a_path_under_a_host_cannot_opt_the_host_in() {
    // shop holds shop.other.org and lets blog add /blog under it; blog asks for ACME.
    let mut shop = ServiceDef::new("shop", &["shop.other.org"], &["10.2.1.5:80"]);
    shop.share = vec!["blog".into()];
    let mut blog = ServiceDef::new("blog", &["shop.other.org"], &["10.2.1.6:80"]);
    blog.path = Some("/blog".into());
    blog.acme = Some(true);
    let built = Built {
        table: std::sync::Arc::new(test_table(vec![shop, blog])),
        ..Built::default()
    };
    assert_eq!(built.table.routes.len(), 2, "{:?}", built.table.routes);
    let config = acme("hosts = [\".example.com\"]\nopt_in = true\n");
    let (wanted, opted) = wanted_hosts(&config, &built, unix_now());
    assert!(wanted.is_empty() && opted.is_empty(), "{wanted:?}");
}

#[test]
fn a_service_opts_its_hosts_in_only_where_the_operator_allows_it() {
    let mut built = built(&["a.example.com", "shop.other.org", "*.other.org"]);
    for backend in std::sync::Arc::make_mut(&mut built.table)
        .backends
        .values_mut()
    {
        backend.acme = true;
    }
    let now = unix_now();
    let closed = acme("hosts = [\".example.com\"]\n");
    let (wanted, opted) = wanted_hosts(&closed, &built, now);
    assert_eq!(wanted.iter().collect::<Vec<_>>(), ["a.example.com"]);
    assert!(opted.is_empty(), "opt_in is off by default");
    let open = acme("hosts = [\".example.com\"]\nopt_in = true\nmax_hosts = 1\n");
    let (wanted, opted) = wanted_hosts(&open, &built, now);
    assert_eq!(
        wanted.iter().collect::<Vec<_>>(),
        ["a.example.com", "shop.other.org"],
        "never a wildcard"
    );
    assert_eq!(opted.iter().collect::<Vec<_>>(), ["shop.other.org"]);
    // At the cap the operator's hosts come before those a service asked for.
    let (served, over) = capped(&open, &State::new(), &wanted, &opted);
    assert_eq!(served.iter().collect::<Vec<_>>(), ["a.example.com"]);
    assert_eq!(over, ["shop.other.org"]);
    // Even when the host a service asked for holds a certificate and the operator's does not.
    let holding = State::from([("certs/shop.other.org".to_string(), "PEM".to_string())]);
    let (served, over) = capped(&open, &holding, &wanted, &opted);
    assert_eq!(served.iter().collect::<Vec<_>>(), ["a.example.com"]);
    assert_eq!(over, ["shop.other.org"]);
}

#[test]
fn a_host_is_ordered_without_a_fresh_certificate_unless_it_backs_off() {
    let config = acme("hosts = [\".example.com\"]\nrenew_before = \"30d\"\n");
    let now = unix_now();
    let hosts: BTreeSet<String> = [
        "a.example.com",
        "b.example.com",
        "c.example.com",
        "d.example.com",
    ]
    .map(String::from)
    .into();
    let mut state = State::new();
    state.insert("certs/a.example.com".into(), pem_for("a.example.com", 90));
    // Issued 70 days ago for 90: 20 days left, inside the 30-day window.
    state.insert(
        "certs/b.example.com".into(),
        pem_between("b.example.com", -70 * 86400, 20 * 86400),
    );
    state.insert("certs/c.example.com".into(), "not PEM".into());
    let failed = |until| {
        serde_json::to_string(&Failure {
            reason: "the CA said no".into(),
            attempts: 2,
            until,
        })
        .unwrap()
    };
    state.insert("failures/d.example.com".into(), failed(now + 600));
    assert_eq!(
        needing(&config, &state, &hosts, now),
        ["b.example.com", "c.example.com"],
        "a fresh one is kept, one inside the window renewed, a broken one replaced, a failed one waits"
    );
    state.insert("failures/d.example.com".into(), failed(now - 1));
    assert_eq!(needing(&config, &state, &hosts, now).len(), 3);
}

#[test]
fn the_report_serves_routed_hosts_certificates_and_valid_challenges_and_names_failures() {
    let now = unix_now();
    let hosts: BTreeSet<String> = ["a.example.com".to_string()].into();
    let mut state = State::new();
    state.insert("certs/a.example.com".into(), pem_for("a.example.com", 90));
    state.insert(
        "certs/gone.example.com".into(),
        pem_for("gone.example.com", 90),
    );
    state.insert(
        "challenges/a.example.com/tok_1".into(),
        "tok_1.thumb".into(),
    );
    state.insert("challenges/a.example.com/bad token".into(), "x".into());
    state.insert(
        "challenges/a.example.com/tok_2".into(),
        "other.thumb".into(),
    );
    state.insert(
        "challenges/gone.example.com/tok_3".into(),
        "tok_3.thumb".into(),
    );
    state.insert("challenges/tok_4".into(), "tok_4.thumb".into());
    state.insert(
        "failures/a.example.com".into(),
        serde_json::to_string(&Failure {
            reason: "rateLimited".into(),
            attempts: 1,
            until: now + 60,
        })
        .unwrap(),
    );
    let report = report_of(&state, &hosts, now);
    assert_eq!(report.source, SourceId::Acme);
    assert_eq!(
        report.certificates.keys().collect::<Vec<_>>(),
        [".acme.a.example.com"],
        "only routed hosts' certificates are served"
    );
    assert_eq!(
        report.challenges,
        [("tok_1".to_string(), "tok_1.thumb".to_string())].into()
    );
    let subjects: Vec<&str> = report.rejected.iter().map(|r| r.subject.as_str()).collect();
    // The bad token, the one of another token, the failure; nothing of hosts not wanted.
    assert_eq!(subjects.len(), 3, "{:?}", report.rejected);
    assert!(report
        .rejected
        .iter()
        .any(|r| r.reason.contains("rateLimited") && r.reason.contains("next order after")));
}

#[tokio::test]
async fn the_local_store_keeps_its_state_across_restarts_and_locks_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acme");
    let (store, mut watch) = Store::local(&path).unwrap();
    let stop = CancellationToken::new();
    assert_eq!(watch.next(&stop, |_| {}).await.unwrap().state, State::new());
    assert!(store.put("account", "{}", true).await.unwrap());
    assert!(
        !store.put("account", "{\"other\":1}", true).await.unwrap(),
        "create-only"
    );
    store
        .put("certs/a.example.com", "PEM", false)
        .await
        .unwrap();
    let seen = watch.next(&stop, |_| {}).await.unwrap().state;
    assert_eq!(seen.get("account").map(String::as_str), Some("{}"));
    assert!(store.lock("a.example.com").await.unwrap());
    assert!(!store.lock("a.example.com").await.unwrap());
    store.unlock("a.example.com").await.unwrap();
    assert!(store.lock("a.example.com").await.unwrap());
    store.delete("certs/a.example.com").await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the keys are weft's alone");
    drop(store);
    let (_, mut again) = Store::local(&path).unwrap();
    let state = again.next(&stop, |_| {}).await.unwrap().state;
    assert_eq!(state.keys().collect::<Vec<_>>(), ["account"]);
    // Past its bound (a sparse file): refused, read no further than the bound.
    let file = std::fs::File::create(path.join(crate::sources::acme::store::LOCAL_FILE)).unwrap();
    file.set_len(crate::sources::acme::store::MAX_LOCAL_FILE + 1)
        .unwrap();
    let err = Store::local(&path).err().unwrap();
    assert!(
        crate::sources::error_chain(&err).contains("larger than 256 MiB"),
        "{err}"
    );
}

/// A certificate for `host` valid from `from` to `to` seconds from now.
fn pem_between(host: &str, from: i64, to: i64) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(to);
    let cert = params.self_signed(&key).unwrap();
    format!("{}{}", cert.pem(), key.serialize_pem())
}

#[test]
fn a_renewal_is_never_due_in_a_certificates_first_quarter() {
    // 7-day certificates with the default renew_before of 30 days: without the guard every
    // certificate would be due as soon as it is issued, and renewed in a loop.
    let config = acme("hosts = [\".example.com\"]\n");
    let now = unix_now();
    let hosts: BTreeSet<String> = ["a.example.com".to_string()].into();
    let mut state = State::new();
    state.insert(
        "certs/a.example.com".into(),
        pem_between("a.example.com", -60, 7 * 86400),
    );
    assert!(needing(&config, &state, &hosts, now).is_empty());
    state.insert(
        "certs/a.example.com".into(),
        pem_between("a.example.com", -2 * 86400, 5 * 86400),
    );
    assert_eq!(needing(&config, &state, &hosts, now), ["a.example.com"]);
}

#[test]
fn a_certificate_stored_under_one_host_never_serves_another() {
    let config = acme("hosts = [\".example.com\"]\n");
    let now = unix_now();
    let hosts: BTreeSet<String> = ["a.example.com".to_string()].into();
    let mut state = State::new();
    state.insert("certs/a.example.com".into(), pem_for("b.example.com", 90));
    let report = report_of(&state, &hosts, now);
    assert!(report.certificates.is_empty());
    assert!(
        report.rejected[0].reason.contains("not exactly"),
        "{:?}",
        report.rejected
    );
    assert_eq!(needing(&config, &state, &hosts, now), ["a.example.com"]);
}

#[test]
fn a_failure_time_from_the_store_is_kept_within_a_backoff() {
    let now = unix_now();
    let hosts: BTreeSet<String> = ["a.example.com".to_string()].into();
    let mut state = State::new();
    state.insert(
        "failures/a.example.com".into(),
        r#"{"reason":"x","attempts":1,"until":300000000000}"#.into(),
    );
    // Past the year 9999 a time does not print: the report must not panic.
    let report = report_of(&state, &hosts, now);
    assert!(report.rejected[0].reason.contains("next order after"));
    assert!(failure(&state, "a.example.com").unwrap().until <= now + 24 * 3600 + 1);
}

#[test]
fn beyond_max_hosts_the_hosts_holding_a_certificate_keep_it_and_the_rest_are_named() {
    let config = acme("hosts = [\".example.com\"]\nmax_hosts = 2\n");
    let hosts: BTreeSet<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|h| format!("{h}.example.com"))
        .collect();
    let state = State::from([("certs/d.example.com".to_string(), "PEM".to_string())]);
    let (served, over) = capped(&config, &state, &hosts, &BTreeSet::new());
    assert_eq!(
        served.iter().collect::<Vec<_>>(),
        ["a.example.com", "d.example.com"],
        "d keeps its certificate, then by name"
    );
    assert_eq!(over, ["b.example.com", "c.example.com"]);
    let rejected = over_rejected(&config, &over);
    assert_eq!(
        rejected.reason,
        "4 routed hosts want a certificate and tls.acme.max_hosts is 2: none is ordered for \
         b.example.com, c.example.com"
    );
    let few: BTreeSet<String> = hosts.iter().take(2).cloned().collect();
    let (served, over) = capped(&config, &state, &few, &BTreeSet::new());
    assert!(matches!(served, std::borrow::Cow::Borrowed(_)) && over.is_empty());
    assert!(issues("max_hosts = 0\n")
        .iter()
        .any(|i| i.starts_with("tls.acme.max_hosts")));
    assert!(issues("collect_after = \"1s\"\n")
        .iter()
        .any(|i| i.starts_with("tls.acme.collect_after")));
    let shared = |keys: &str| {
        let text = format!(
            "[sources.consul]\nurl = \"http://127.0.0.1:8500\"\n[tls]\ncerts = \"certs\"\n\
             [tls.acme]\ndirectory = \"https://ca.test/dir\"\nemail = \"ops@example.com\"\n{keys}"
        );
        Config::parse(&text, Path::new("/etc/weft"))
            .err()
            .unwrap_or_default()
    };
    assert!(shared("collect_after = \"5m\"\n")
        .iter()
        .any(|i| i.key == "tls.acme.collect_after"));
    assert!(shared("collect_after = \"10m\"\n").is_empty());
}

#[test]
fn the_store_is_collected_of_what_no_edge_certifies_and_of_stale_entries_at_their_versions() {
    let config = acme("hosts = [\".example.com\"]\ncollect_after = \"1h\"\n");
    let unix = unix_now();
    let failure = |until: i64| {
        serde_json::to_string(&Failure {
            reason: "x".into(),
            attempts: 1,
            until,
        })
        .unwrap()
    };
    let state = State::from(
        [
            ("account", "{}".to_string()),
            ("certs/kept.example.com", pem_for("kept.example.com", 30)),
            // Expired, but not yet for collect_after: an edge's clock may run ahead.
            (
                "certs/expired.example.com",
                pem_between("expired.example.com", -100, -10),
            ),
            (
                "certs/long-expired.example.com",
                pem_between("long-expired.example.com", -9000, -7300),
            ),
            ("certs/gone.example.com", pem_for("gone.example.com", 30)),
            ("orders/gone.example.com", "https://ca.test/order/1".into()),
            ("locks/gone.example.com", "edge-a".into()),
            ("locks/held.example.com", "edge-b".into()),
            ("challenges/gone.example.com/tok", "tok.key".into()),
            ("certs/other.example.com", pem_for("other.example.com", 30)),
            ("failures/kept.example.com", failure(unix + 60)),
            ("failures/old.example.com", failure(unix - 2 * 3600)),
            ("challenges/kept.example.com/left", "left.key".into()),
            ("unknown/thing", "x".into()),
            ("certs/..", "x".into()),
            ("acks/kept.example.com/left/s1", "edge".into()),
            ("acks/kept.example.com/done/s1", "edge".into()),
            // Another edge alive certifies other.example.com; an edge gone listed gone.
            ("wanted/s2", "other.example.com\nkept.example.com".into()),
            ("wanted/s3", "gone.example.com".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let versions = state.keys().zip(1..).map(|(k, v)| (k.clone(), v)).collect();
    let read = Read {
        state,
        versions,
        held: ["wanted/s2", "locks/held.example.com"]
            .map(String::from)
            .into(),
    };
    let wanted: BTreeSet<String> = ["kept.example.com", "expired.example.com", "old.example.com"]
        .iter()
        .map(|h| h.to_string())
        .collect();
    let mut seen = Seen::default();
    let start = tokio::time::Instant::now();
    let keys = |garbage: Vec<(String, u64)>| -> Vec<String> {
        garbage
            .into_iter()
            .map(|(key, version)| {
                assert_eq!(
                    Some(&version),
                    read.versions.get(&key),
                    "{key} at its version"
                );
                key
            })
            .collect()
    };
    assert_eq!(
        keys(seen.garbage(&config, &read, &wanted, start, unix)),
        [
            "acks/kept.example.com/done/s1",
            "certs/long-expired.example.com",
            "failures/old.example.com",
            "wanted/s3",
        ],
        "at first only what is stale whoever certifies it"
    );
    let later = start + Duration::from_secs(3600);
    assert_eq!(
        keys(seen.garbage(&config, &read, &wanted, later, unix)),
        [
            "acks/kept.example.com/done/s1",
            "certs/gone.example.com",
            "certs/long-expired.example.com",
            "challenges/gone.example.com/tok",
            "challenges/kept.example.com/left",
            "failures/old.example.com",
            "locks/gone.example.com",
            "orders/gone.example.com",
            "wanted/s3",
        ],
        "an hour that no edge certifies gone.example.com (other.example.com is another edge's; \
         a held lock stays), and a challenge unchanged longer than any order"
    );
    // A host certified again is no longer collected, and its time starts over.
    let mut again = wanted.clone();
    again.insert("gone.example.com".into());
    let of_gone = |garbage: Vec<(String, u64)>| {
        garbage
            .iter()
            .any(|(k, _)| k.contains("gone.") && !k.starts_with("challenges/"))
    };
    assert!(!of_gone(seen.garbage(&config, &read, &again, later, unix)));
    assert!(!of_gone(seen.garbage(
        &config,
        &read,
        &wanted,
        later + Duration::from_secs(60),
        unix
    )));
    // A challenge written again (an order resumed, the same key authorization) starts over.
    let mut rewritten = read.clone();
    rewritten
        .versions
        .insert("challenges/kept.example.com/left".into(), 1000);
    assert!(
        !keys(seen.garbage(&config, &rewritten, &wanted, later, unix))
            .contains(&"challenges/kept.example.com/left".to_string())
    );
}

#[tokio::test]
async fn a_write_under_a_lock_lands_only_while_the_lock_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _watch) = Store::local(&dir.path().join("acme")).unwrap();
    assert!(
        !store
            .write_locked("a.example.com", "certs/a.example.com", Some("PEM"))
            .await
            .unwrap(),
        "no lock, no write"
    );
    assert_eq!(store.get("certs/a.example.com").await.unwrap(), None);
    assert!(store.lock("a.example.com").await.unwrap());
    assert!(store
        .write_locked("a.example.com", "certs/a.example.com", Some("PEM"))
        .await
        .unwrap());
    assert_eq!(
        store.get("certs/a.example.com").await.unwrap().as_deref(),
        Some("PEM")
    );
    assert!(store
        .write_locked("a.example.com", "certs/a.example.com", None)
        .await
        .unwrap());
    assert_eq!(store.get("certs/a.example.com").await.unwrap(), None);
    assert!(store.put("account", "{}", false).await.unwrap());
    // At the version read: a value written since stays.
    let read = store::local_version("{}");
    assert!(store.put("account", "{\"new\":1}", false).await.unwrap());
    assert_eq!(store.collect(&[("account".into(), read)]).await.0, 0);
    assert!(store.put("account", "{}", false).await.unwrap());
    let (deleted, error) = store.collect(&[("account".into(), read)]).await;
    assert_eq!((deleted, error.is_none()), (1, true));
    assert_eq!(store.get("account").await.unwrap(), None);
}
