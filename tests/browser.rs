//! The status page in a real browser: headless Chromium (Debian's `chromium`) opens a running
//! weft's page, which must show the routes, a dropped input with its reason, a degraded source
//! and the live traffic; its filter narrows the lists; the screenshot is saved (the README's).

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{free_port, service, Backend, Weft};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `args` (a profile of its own, removed after; killed
/// if it takes over a minute): its stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser test runs Debian's chromium (apt-get install chromium)"
    );
    let profile = tempfile::Builder::new()
        .prefix("weft-test-chromium-")
        .tempdir()
        .unwrap();
    let output = Command::new("timeout")
        .args(["-k", "5", "60", CHROMIUM])
        // Root (the tests' user) has no sandbox to drop into; the page is weft's own.
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args([
            "--no-first-run",
            "--disable-crash-reporter",
            "--disable-breakpad",
        ])
        // A container's /dev/shm is often 64 MB: Chromium then uses /tmp instead.
        .arg("--disable-dev-shm-usage")
        .arg("--window-size=1400,1000")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The page's text content of the element whose `<h2>` starts with `heading`, up to the next
/// heading: enough to say which section shows what.
fn section<'a>(dom: &'a str, heading: &str) -> &'a str {
    let start = dom
        .find(&format!("<h2>{heading}"))
        .unwrap_or_else(|| panic!("no section {heading:?} in {dom}"));
    let rest = &dom[start + 4..];
    &dom[start..start + 4 + rest.find("<h2>").unwrap_or(rest.len())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_headless_chromium_shows_routes_drops_sources_and_traffic() {
    let a = Backend::start("a").await;
    // A Consul nobody answers: a degraded source.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let weft = Weft::builder()
        .services(
            &(service("shop", &["shop.test"], None, &[a.addr])
                + &service("blog", &["blog.test"], Some("/blog"), &[a.addr])
                + &service(
                    "outside",
                    &["outside.test"],
                    None,
                    &["10.9.9.9:80".parse().unwrap()],
                )),
        )
        .consul(&nobody, "")
        .start()
        .await;
    support::eventually(Duration::from_secs(20), "shop.test served", || async {
        match weft.get("shop.test", "/").await {
            Ok((200, _)) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    for _ in 0..9 {
        assert_eq!(weft.get("shop.test", "/").await.unwrap().0, 200);
    }
    support::eventually(Duration::from_secs(20), "consul degraded", || async {
        let (_, body) = weft.status("/status").await?;
        body.contains("\"degraded\"").then_some(()).ok_or(body)
    })
    .await;

    let url = format!("http://127.0.0.1:{}/", weft.status_port);
    let dom = chromium(&url, &["--dump-dom"]);
    let routes = section(&dom, "Routes");
    assert!(routes.contains("shop.test"), "{routes}");
    assert!(routes.contains("blog.test"), "{routes}");
    assert!(routes.contains(&a.addr.to_string()), "{routes}");
    // Live traffic from HAProxy: shop's ten (or more) 2xx, and none of anything else.
    let shop = &routes[routes.find("<code>shop.test</code>").unwrap()..];
    let shop = &shop[..shop.find("</tr>").unwrap()];
    let counts: Vec<&str> = shop
        .split("<td>")
        .find(|cell| cell.contains(" / "))
        .unwrap()
        .split(" / ")
        .collect();
    let twoxx: u64 = counts[0].trim().parse().unwrap();
    assert!(
        twoxx >= 10 && counts[1] == "0" && counts[2] == "0",
        "{shop}"
    );
    let sources = section(&dom, "Sources");
    assert!(
        sources.contains("consul") && sources.contains("degraded"),
        "{sources}"
    );
    let dropped = section(&dom, "Dropped inputs");
    assert!(dropped.contains("outside"), "{dropped}");
    assert!(
        dropped.contains("10.9.9.9 is outside the allowed networks"),
        "{dropped}"
    );
    assert!(dom.contains("problems"), "the page says weft has problems");

    // The filter box narrows every list on the server (no script needed).
    let filtered = chromium(&format!("{url}?q=blog"), &["--dump-dom"]);
    let routes = section(&filtered, "Routes");
    assert!(
        routes.contains("blog.test") && !routes.contains("shop.test"),
        "{routes}"
    );
    assert!(routes.contains("1 of 3"), "{routes}");
    assert!(section(&filtered, "Dropped inputs").contains("0 of 1"));

    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "a blank page? {} bytes", png.len());
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
}
