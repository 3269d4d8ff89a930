//! The embedded default that `weft demo` runs: two HTTP backends on loopback, a services file
//! routing to them, and weft with HAProxy on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::Path;

use axum::extract::Request;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// weft.toml of the demo; paths inside are relative to the demo directory.
pub const WEFT_TOML: &str = include_str!("../haproxy/demo/weft.toml");
/// services.toml of the demo, with `{backend1}` and `{backend2}` standing for the ports.
pub const SERVICES_TOML: &str = include_str!("../haproxy/demo/services.toml");

/// Starts a backend on `listener` that answers every request with its name and the path.
pub async fn serve_backend(
    name: &'static str,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(move |request: Request| async move {
        format!(
            "hello from {name} ({addr}), path {}\n",
            request.uri().path()
        )
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Writes the demo's weft.toml and services.toml into `dir`, pointing at the two backends.
pub fn write_files(dir: &Path, backend1: SocketAddr, backend2: SocketAddr) -> std::io::Result<()> {
    std::fs::write(dir.join("weft.toml"), WEFT_TOML)?;
    let services = SERVICES_TOML
        .replace("{backend1}", &backend1.port().to_string())
        .replace("{backend2}", &backend2.port().to_string());
    std::fs::write(dir.join("services.toml"), services)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_embedded_default_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        write_files(
            dir.path(),
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
        )
        .unwrap();
        let config = Config::load(&dir.path().join("weft.toml")).unwrap();
        // The demo runs on developers' machines: it never touches their links.
        assert_eq!(config.bridge.mode, crate::config::BridgeMode::Off);
        let text = std::fs::read_to_string(dir.path().join("services.toml")).unwrap();
        let content = crate::sources::file::parse(&text, Path::new("services.toml")).unwrap();
        assert_eq!(content.services.len(), 3);
        assert!(content.rejected.is_empty());
        let report = crate::model::SourceReport {
            certificates: Default::default(),
            challenges: Default::default(),
            services: content.services,
            ..crate::model::SourceReport::starting(crate::model::SourceId::File)
        };
        let built = crate::model::build(
            &[&report],
            &config.model_settings([]),
            &crate::model::Ledger::default(),
        );
        assert!(built.dropped.is_empty(), "{:?}", built.dropped);
        assert_eq!(built.table.routes.len(), 3);
    }
}
