//! The agent's certificate for its id: held in memory, or in a JSON file of the
//! caller's (mode 0600, replaced atomically) so another process can use it too.

use crate::error::Error;
use crate::protocol;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the certificate lives.
#[derive(Debug)]
pub(crate) struct CertificateStore {
    file: Option<PathBuf>,
    current: Option<Value>,
}

impl CertificateStore {
    /// A store in memory, or backed by `file` (read now if it exists).
    pub(crate) fn open(file: Option<PathBuf>, agent_id: &str) -> Result<Self, Error> {
        let current = match &file {
            Some(path) => read(path)?.filter(|certificate| {
                let mine = certificate["agent_id"] == agent_id;
                if !mine {
                    log::warn!(
                        "{} holds a certificate for {}, not {agent_id}: not used",
                        path.display(),
                        certificate["agent_id"]
                    );
                }
                mine
            }),
            None => None,
        };
        Ok(Self { file, current })
    }

    /// The certificate, if the agent has one.
    pub(crate) fn get(&self) -> Option<&Value> {
        self.current.as_ref()
    }

    /// Keeps `certificate`, then writes the file: the server has revoked the one it
    /// replaces, so it is kept in memory even when the file cannot be written (`Err`).
    pub(crate) fn set(&mut self, certificate: Value) -> Result<(), Error> {
        let certificate = self.current.insert(certificate);
        match &self.file {
            Some(path) => write(path, certificate),
            None => Ok(()),
        }
    }

    /// Forgets the certificate (the server rejected it).
    pub(crate) fn clear(&mut self) {
        self.current = None;
        if let Some(path) = &self.file {
            if let Err(error) = std::fs::remove_file(path) {
                if error.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {error}", path.display());
                }
            }
        }
    }

    /// Whether the certificate has more than half of its lifetime left.
    pub(crate) fn is_fresh(&self) -> bool {
        self.times().is_some_and(|(issued, expires)| {
            expires - protocol::epoch_secs() > (expires - issued) / 2.0
        })
    }

    /// How long to wait before trying again after a renewal: an eighth of the
    /// certificate's lifetime, between 100 ms and a minute (a minute without one).
    pub(crate) fn renewal_retry(&self) -> Duration {
        let lifetime = self
            .times()
            .and_then(|(issued, expires)| Duration::try_from_secs_f64(expires - issued).ok());
        lifetime.map_or(Duration::from_secs(60), |lifetime| {
            (lifetime / 8).clamp(Duration::from_millis(100), Duration::from_secs(60))
        })
    }

    /// `issued_at` and `expires_at` of the certificate, if it has them.
    fn times(&self) -> Option<(f64, f64)> {
        let certificate = self.current.as_ref()?;
        Some((
            certificate["issued_at"].as_f64()?,
            certificate["expires_at"].as_f64()?,
        ))
    }
}

fn read(path: &Path) -> Result<Option<Value>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(certificate) => Ok(Some(certificate)),
            Err(error) => {
                log::warn!("{} is not a certificate ({error}): ignored", path.display());
                Ok(None)
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(Error::Certificate(format!(
            "cannot read {}: {error}",
            path.display()
        ))),
    }
}

fn write(path: &Path, certificate: &Value) -> Result<(), Error> {
    use std::io::Write;
    let fail = |error: std::io::Error| {
        Error::Certificate(format!("cannot write {}: {error}", path.display()))
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temporary).map_err(fail)?;
    file.write_all(certificate.to_string().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(fail)?;
    std::fs::rename(&temporary, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn a_file_certificate_survives_the_store_and_is_private() {
        let path = scratch("a.json");
        let mut store = CertificateStore::open(Some(path.clone()), "a").unwrap();
        assert!(store.get().is_none());
        store
            .set(json!({"agent_id": "a", "signature": "s"}))
            .unwrap();
        let again = CertificateStore::open(Some(path.clone()), "a").unwrap();
        assert_eq!(again.get().unwrap()["signature"], "s");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = CertificateStore::open(Some(path.clone()), "b").unwrap();
        assert!(
            other.get().is_none(),
            "another id's certificate is not used"
        );
        store.clear();
        assert!(!path.exists());
    }

    #[test]
    fn freshness_is_half_the_lifetime() {
        let now = protocol::epoch_secs();
        let mut store = CertificateStore::open(None, "a").unwrap();
        store
            .set(json!({"agent_id": "a", "issued_at": now - 10.0, "expires_at": now + 100.0}))
            .unwrap();
        assert!(store.is_fresh());
        store
            .set(json!({"agent_id": "a", "issued_at": now - 100.0, "expires_at": now + 10.0}))
            .unwrap();
        assert!(!store.is_fresh());
        assert_eq!(store.renewal_retry(), Duration::from_secs_f64(110.0 / 8.0));
        store.clear();
        assert_eq!(store.renewal_retry(), Duration::from_secs(60));
    }
}
