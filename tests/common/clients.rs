//! Peers for the client libraries' tests (tests/clients.rs): the Python library's echo
//! agent, and a TLS-terminating proxy with a certificate of the test's own.

use super::DEADLINE;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A Python `tether-agent` echo agent (clients/python/examples/echo.py).
pub struct PythonEcho {
    /// The script's process (killed when dropped).
    pub child: tokio::process::Child,
}

impl PythonEcho {
    /// Starts it as `agent_id` at `url` and waits until it registered.
    pub async fn start(url: &str, agent_id: &str) -> Self {
        let python = match std::env::var("TETHER_TEST_CLIENT_PYTHON") {
            Ok(python) if !python.is_empty() => python,
            _ => panic!(
                "TETHER_TEST_CLIENT_PYTHON is not set. This test runs the Python client \
                 library's echo example: run the tests with scripts/test.sh (it installs \
                 clients/python into .venv-clients and exports the variable), or set it to a \
                 Python that has `pip install ./clients/python` done."
            ),
        };
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/python/examples/echo.py"
        );
        let mut child = tokio::process::Command::new(python)
            .args([script, "--url", url, "--agent-id", agent_id])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run TETHER_TEST_CLIENT_PYTHON");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the Python echo agent did not register in time")
            .unwrap()
            .expect("the Python echo agent exited before registering");
        assert_eq!(line, format!("registered {agent_id} 1"));
        Self { child }
    }
}

/// A TLS-terminating proxy to `target` on `localhost`, with a self-signed certificate
/// for `localhost` that it writes to `ca_file`; its port.
pub async fn tls_proxy(target: String, ca_file: &std::path::Path) -> u16 {
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::rustls::{crypto::ring, ServerConfig};
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(ca_file, cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let config = ServerConfig::builder_with_provider(std::sync::Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, target) = (acceptor.clone(), target.clone());
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut upstream)) = (
                    acceptor.accept(tcp).await,
                    tokio::net::TcpStream::connect(&target).await,
                ) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}
