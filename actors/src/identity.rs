//! Identity certificates (PROTOCOL.md §3): issuing, validating and revoking the
//! HMAC-SHA256-signed certificates that let an agent take over its own id.
//!
//! The [`CertificateAuthority`] is plain state owned by the registry actor.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

type HmacSha256 = Hmac<Sha256>;

/// Why a claim or a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateError {
    /// The id is claimed by an unexpired certificate and the claim was not forced.
    AlreadyClaimed(String),
    /// The certificate is not a well-formed certificate object.
    Malformed(&'static str),
    /// The signature or hash does not check.
    BadSignature,
    /// The certificate has expired.
    Expired,
    /// The certificate was revoked by a forced claim.
    Revoked,
    /// The certificate is for another agent id.
    WrongAgent {
        /// The id the certificate was issued for.
        certificate_for: String,
    },
}

impl std::fmt::Display for CertificateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AlreadyClaimed(id) => write!(f, "Agent ID {id} is already claimed"),
            Self::Malformed(what) => write!(f, "Certificate is malformed: {what}"),
            Self::BadSignature => write!(f, "Certificate signature is invalid"),
            Self::Expired => write!(f, "Certificate has expired"),
            Self::Revoked => write!(f, "Certificate has been revoked"),
            Self::WrongAgent { certificate_for } => {
                write!(f, "Certificate was issued for agent {certificate_for}")
            }
        }
    }
}

impl std::error::Error for CertificateError {}

/// Issues and checks certificates with one server secret.
pub struct CertificateAuthority {
    secret: Vec<u8>,
    ttl_secs: f64,
    /// Current claim per agent id: certificate hash and expiry.
    claims: HashMap<String, (String, f64)>,
    /// Hashes of certificates revoked by forced claims.
    revoked: HashSet<String>,
}

impl CertificateAuthority {
    /// An authority signing with `secret`, issuing certificates valid for `ttl_secs`.
    pub fn new(secret: Vec<u8>, ttl_secs: f64) -> Self {
        Self {
            secret,
            ttl_secs,
            claims: HashMap::new(),
            revoked: HashSet::new(),
        }
    }

    /// A fresh random 32-byte secret, for servers with none configured.
    pub fn generate_secret() -> Vec<u8> {
        let mut secret = vec![0u8; 32];
        getrandom::getrandom(&mut secret).expect("the operating system has no random source");
        secret
    }

    /// Claims `agent_id` and returns its certificate as JSON.
    pub fn claim(
        &mut self,
        agent_id: &str,
        force: bool,
        now: f64,
    ) -> Result<Value, CertificateError> {
        if let Some((hash, expires_at)) = self.claims.get(agent_id) {
            if *expires_at > now && !force {
                return Err(CertificateError::AlreadyClaimed(agent_id.to_owned()));
            }
            self.revoked.insert(hash.clone());
        }
        self.prune_expired(now);
        // Both times are whole milliseconds: their shortest decimal form then parses
        // back to the same f64 (serde_json's float parsing is not exact for every
        // 17-digit value, and the hash is computed over these numbers).
        let issued_at = (now * 1000.0).round() / 1000.0;
        let expires_at = ((issued_at + self.ttl_secs) * 1000.0).round() / 1000.0;
        let hash = certificate_hash(agent_id, issued_at, expires_at);
        let signature = self.sign(&hash);
        self.claims
            .insert(agent_id.to_owned(), (hash.clone(), expires_at));
        Ok(json!({
            "agent_id": agent_id, "issued_at": issued_at, "expires_at": expires_at,
            "certificate_hash": hash, "signature": signature,
        }))
    }

    /// Checks a certificate; `Ok` carries the agent id it was issued for.
    pub fn validate(&self, certificate: &Value, now: f64) -> Result<String, CertificateError> {
        let cert = certificate
            .as_object()
            .ok_or(CertificateError::Malformed("not an object"))?;
        let agent_id = cert
            .get("agent_id")
            .and_then(Value::as_str)
            .ok_or(CertificateError::Malformed("no agent_id"))?;
        let issued_at = cert
            .get("issued_at")
            .and_then(Value::as_f64)
            .ok_or(CertificateError::Malformed("no issued_at"))?;
        let expires_at = cert
            .get("expires_at")
            .and_then(Value::as_f64)
            .ok_or(CertificateError::Malformed("no expires_at"))?;
        let hash = cert
            .get("certificate_hash")
            .and_then(Value::as_str)
            .ok_or(CertificateError::Malformed("no certificate_hash"))?;
        let signature = cert
            .get("signature")
            .and_then(Value::as_str)
            .ok_or(CertificateError::Malformed("no signature"))?;
        if certificate_hash(agent_id, issued_at, expires_at) != hash {
            return Err(CertificateError::BadSignature);
        }
        let signature = hex::decode(signature).map_err(|_| CertificateError::BadSignature)?;
        let mut mac = self.mac();
        mac.update(hash.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| CertificateError::BadSignature)?;
        if expires_at <= now {
            return Err(CertificateError::Expired);
        }
        if self.revoked.contains(hash) {
            return Err(CertificateError::Revoked);
        }
        Ok(agent_id.to_owned())
    }

    /// Checks that `certificate` is valid and was issued for `agent_id`.
    pub fn validate_for(
        &self,
        certificate: &Value,
        agent_id: &str,
        now: f64,
    ) -> Result<(), CertificateError> {
        let certificate_for = self.validate(certificate, now)?;
        if certificate_for != agent_id {
            return Err(CertificateError::WrongAgent { certificate_for });
        }
        Ok(())
    }

    fn sign(&self, hash: &str) -> String {
        let mut mac = self.mac();
        mac.update(hash.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    /// Forgets claims that expired (their certificates can no longer validate anyway).
    fn prune_expired(&mut self, now: f64) {
        if self.claims.len() > 1024 && self.claims.len().is_power_of_two() {
            self.claims.retain(|_, (_, expires_at)| *expires_at > now);
        }
    }
}

fn certificate_hash(agent_id: &str, issued_at: f64, expires_at: f64) -> String {
    let digest = Sha256::digest(format!("{agent_id}|{issued_at}|{expires_at}").as_bytes());
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_validates_for_its_agent_only() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 60.0);
        let cert = ca.claim("alice", false, 1000.0).unwrap();
        assert_eq!(ca.validate_for(&cert, "alice", 1001.0), Ok(()));
        assert!(matches!(
            ca.validate_for(&cert, "bob", 1001.0),
            Err(CertificateError::WrongAgent { .. })
        ));
        assert_eq!(ca.validate(&cert, 2000.0), Err(CertificateError::Expired));
    }

    #[test]
    fn forged_and_revoked_certificates_are_rejected() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 60.0);
        let cert = ca.claim("alice", false, 1000.0).unwrap();
        let mut forged = cert.clone();
        forged["expires_at"] = json!(99999.0);
        assert_eq!(
            ca.validate(&forged, 1001.0),
            Err(CertificateError::BadSignature)
        );
        let other = CertificateAuthority::new(b"other".to_vec(), 60.0);
        assert_eq!(
            other.validate(&cert, 1001.0),
            Err(CertificateError::BadSignature)
        );
        assert!(matches!(
            ca.claim("alice", false, 1001.0),
            Err(CertificateError::AlreadyClaimed(_))
        ));
        let newer = ca.claim("alice", true, 1002.0).unwrap();
        assert_eq!(ca.validate(&cert, 1003.0), Err(CertificateError::Revoked));
        assert_eq!(ca.validate(&newer, 1003.0), Ok("alice".to_owned()));
    }

    #[test]
    fn certificates_with_a_fractional_ttl_survive_a_json_round_trip() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 0.3);
        for i in 0..2000 {
            let now = 1795393766.153 + f64::from(i) * 0.0137;
            let cert = ca.claim(&format!("agent-{i}"), false, now).unwrap();
            let back: Value = serde_json::from_str(&cert.to_string()).unwrap();
            assert_eq!(ca.validate(&back, now), Ok(format!("agent-{i}")), "{cert}");
        }
    }

    #[test]
    fn certificates_survive_a_json_round_trip() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 86400.0);
        let cert = ca.claim("alice", false, 1795393766.153).unwrap();
        let back: Value = serde_json::from_str(&cert.to_string()).unwrap();
        assert_eq!(ca.validate_for(&back, "alice", 1795393767.0), Ok(()));
    }
}
