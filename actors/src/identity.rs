//! Identity certificates (PROTOCOL.md §3): issuing, validating and revoking the
//! HMAC-SHA256-signed certificates that let an agent take over its own id.
//!
//! The [`CertificateAuthority`] is plain state owned by the registry actor.
//!
//! A certificate is accepted when its signature checks, it has not expired, and it is
//! the **current claim** of its id or its id has **no current claim** (so certificates
//! survive a restart when the secret is configured). The table of current claims holds
//! only what must be held, so its memory is bounded:
//! - a claim not yet bound to a registration, for `identity.claim_ttl` seconds, at most
//!   `limits.max_outstanding_claims` of them;
//! - the claim of each registered agent, until its incarnation ends. A registration
//!   that did not come with the current claim (its certificate, or the connection that
//!   claimed) replaces the claim with "registered without a certificate": while that
//!   agent is live, no certificate for its id is accepted, so an id pre-claimed by a
//!   stranger cannot later be taken from the agent that registered it.
//!
//! A new claim replaces the current one, which revokes the previous certificate for as
//! long as the new claim is current.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

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
    /// The server holds its limit of claims not bound to a registration.
    TooManyClaims(usize),
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
            Self::TooManyClaims(max) => write!(
                f,
                "The server holds its limit of {max} claims not yet bound to a registration \
                 (limits.max_outstanding_claims); register, or try again later"
            ),
        }
    }
}

impl std::error::Error for CertificateError {}

/// The current claim of one agent id.
#[derive(Debug)]
struct Claim {
    /// The hash of the one certificate accepted for the id; `None`: the id is
    /// registered without a certificate, and none is accepted.
    hash: Option<String>,
    /// Until when an unbound claim holds the id; `None` once bound to a registration.
    unbound_until: Option<f64>,
    /// The connection that claimed it.
    claimant: u64,
    /// When its certificate was issued (minus infinity when not issued here).
    issued_at: f64,
    /// When its certificate expires (infinite for "registered without a certificate").
    expires_at: f64,
}

impl Claim {
    /// Whether the claim is current: its certificate unexpired, and bound, or unbound
    /// within its time.
    fn holds(&self, now: f64) -> bool {
        self.expires_at > now && self.unbound_until.is_none_or(|until| until > now)
    }
}

/// Issues and checks certificates with one server secret.
pub struct CertificateAuthority {
    secret: Vec<u8>,
    ttl_secs: f64,
    claim_ttl: f64,
    max_unbound: usize,
    /// Current claim per agent id.
    claims: HashMap<String, Claim>,
    /// Claims in `claims` not bound to a registration.
    unbound: usize,
    /// When unbound claims were last swept (at most once a second).
    swept_at: f64,
}

impl CertificateAuthority {
    /// An authority signing with `secret`, issuing certificates valid for `ttl_secs`.
    pub fn new(secret: Vec<u8>, ttl_secs: f64) -> Self {
        Self {
            secret,
            ttl_secs,
            claim_ttl: 300.0,
            max_unbound: usize::MAX,
            claims: HashMap::new(),
            unbound: 0,
            swept_at: f64::NEG_INFINITY,
        }
    }

    /// The same authority holding an unbound claim `claim_ttl` seconds, and at most
    /// `max_unbound` of them.
    pub fn with_claim_limits(mut self, claim_ttl: f64, max_unbound: usize) -> Self {
        self.claim_ttl = claim_ttl;
        self.max_unbound = max_unbound;
        self
    }

    /// Entries in the table of current claims (bound and unbound).
    pub fn claims_held(&self) -> usize {
        self.claims.len()
    }

    /// `agent_id` registered from connection `session`, with `certificate_hash` if it
    /// presented a valid certificate: binds the current claim if the registration
    /// came with it, else replaces it with "registered without a certificate".
    pub fn registered(&mut self, agent_id: &str, session: u64, certificate_hash: Option<&str>) {
        let with_claim = self.claims.get(agent_id).is_some_and(|claim| {
            claim.claimant == session
                || (claim.hash.is_some() && claim.hash.as_deref() == certificate_hash)
        });
        let previous = if with_claim {
            let claim = self.claims.get_mut(agent_id).expect("checked above");
            claim.unbound_until.take()
        } else {
            let claim = Claim {
                hash: certificate_hash.map(str::to_owned),
                unbound_until: None,
                claimant: session,
                issued_at: f64::NEG_INFINITY,
                expires_at: f64::INFINITY,
            };
            self.claims
                .insert(agent_id.to_owned(), claim)
                .and_then(|old| old.unbound_until)
        };
        if previous.is_some() {
            self.unbound -= 1;
        }
    }

    /// `agent_id`'s incarnation ended: its claim is forgotten (its certificate stays
    /// valid, the id having no current claim).
    pub fn released(&mut self, agent_id: &str) {
        if let Some(old) = self.claims.remove(agent_id) {
            if old.unbound_until.is_some() {
                self.unbound -= 1;
            }
        }
    }

    /// A fresh random 32-byte secret, for servers with none configured.
    pub fn generate_secret() -> Vec<u8> {
        let mut secret = vec![0u8; 32];
        getrandom::getrandom(&mut secret).expect("the operating system has no random source");
        secret
    }

    /// Claims `agent_id` for connection `claimant` and returns its certificate as JSON.
    /// An id with a current claim is claimed again only with `force` (which revokes
    /// the current certificate); the registry decides who may claim a live id.
    pub fn claim(
        &mut self,
        agent_id: &str,
        claimant: u64,
        force: bool,
        now: f64,
    ) -> Result<Value, CertificateError> {
        self.sweep(now);
        let current = self.claims.get(agent_id).filter(|claim| claim.holds(now));
        // "Registered without a certificate" blocks no claim: the registry lets only
        // the holder's own connection claim a live id.
        let blocking = current.is_some_and(|claim| claim.hash.is_some());
        if blocking && !force {
            return Err(CertificateError::AlreadyClaimed(agent_id.to_owned()));
        }
        let bound = self
            .claims
            .get(agent_id)
            .is_some_and(|claim| claim.unbound_until.is_none());
        if !bound && current.is_none() && self.unbound >= self.max_unbound {
            return Err(CertificateError::TooManyClaims(self.max_unbound));
        }
        // Both times are whole milliseconds: their shortest decimal form then parses
        // back to the same f64 (serde_json's float parsing is not exact for every
        // 17-digit value, and the hash is computed over these numbers).
        let mut issued_at = (now * 1000.0).round() / 1000.0;
        // The hash covers the id and the times only: a claim in the same millisecond
        // as the one it replaces gets a later time, so it never reissues (and thereby
        // fails to revoke) the certificate it replaces.
        if let Some(previous) = self.claims.get(agent_id) {
            if issued_at <= previous.issued_at {
                issued_at = ((previous.issued_at * 1000.0).round() + 1.0) / 1000.0;
            }
        }
        let expires_at = ((issued_at + self.ttl_secs) * 1000.0).round() / 1000.0;
        let hash = certificate_hash(agent_id, issued_at, expires_at);
        let signature = self.sign(&hash);
        // A forced claim of a registered id (its holder's own) stays bound.
        let claim = Claim {
            hash: Some(hash.clone()),
            unbound_until: (!bound).then_some(now + self.claim_ttl),
            claimant,
            issued_at,
            expires_at,
        };
        let old = self.claims.insert(agent_id.to_owned(), claim);
        if !bound && old.is_none_or(|old| old.unbound_until.is_none()) {
            self.unbound += 1;
        }
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
        if let Some(claim) = self.claims.get(agent_id) {
            if claim.hash.as_deref() != Some(hash) && claim.holds(now) {
                return Err(CertificateError::Revoked);
            }
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

    /// Forgets unbound claims past `claim_ttl`; at most once a second, so a client at
    /// the limit cannot make every claim a full sweep.
    fn sweep(&mut self, now: f64) {
        if self.unbound == 0 || now - self.swept_at < 1.0 {
            return;
        }
        self.swept_at = now;
        let before = self.claims.len();
        self.claims.retain(|_, claim| claim.holds(now));
        self.unbound -= before - self.claims.len();
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
        let cert = ca.claim("alice", 1, false, 1000.0).unwrap();
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
        let cert = ca.claim("alice", 1, false, 1000.0).unwrap();
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
            ca.claim("alice", 2, false, 1001.0),
            Err(CertificateError::AlreadyClaimed(_))
        ));
        let newer = ca.claim("alice", 2, true, 1002.0).unwrap();
        assert_eq!(ca.validate(&cert, 1003.0), Err(CertificateError::Revoked));
        assert_eq!(ca.validate(&newer, 1003.0), Ok("alice".to_owned()));
    }

    #[test]
    fn claims_in_the_same_millisecond_still_revoke_what_they_replace() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 60.0);
        let first = ca.claim("alice", 1, false, 1000.0).unwrap();
        let second = ca.claim("alice", 1, true, 1000.0).unwrap();
        let third = ca.claim("alice", 1, true, 1000.0004).unwrap();
        assert_ne!(first["certificate_hash"], second["certificate_hash"]);
        assert_ne!(second["certificate_hash"], third["certificate_hash"]);
        assert_eq!(ca.validate(&first, 1000.5), Err(CertificateError::Revoked));
        assert_eq!(ca.validate(&second, 1000.5), Err(CertificateError::Revoked));
        assert_eq!(ca.validate(&third, 1000.5), Ok("alice".to_owned()));
        assert_eq!(third["issued_at"], 1000.002);
    }

    #[test]
    fn certificates_with_a_fractional_ttl_survive_a_json_round_trip() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 0.3);
        for i in 0..2000 {
            let now = 1795393766.153 + f64::from(i) * 0.0137;
            let cert = ca.claim(&format!("agent-{i}"), 1, false, now).unwrap();
            let back: Value = serde_json::from_str(&cert.to_string()).unwrap();
            assert_eq!(ca.validate(&back, now), Ok(format!("agent-{i}")), "{cert}");
        }
    }

    #[test]
    fn certificates_survive_a_json_round_trip() {
        let mut ca = CertificateAuthority::new(b"secret".to_vec(), 86400.0);
        let cert = ca.claim("alice", 1, false, 1795393766.153).unwrap();
        let back: Value = serde_json::from_str(&cert.to_string()).unwrap();
        assert_eq!(ca.validate_for(&back, "alice", 1795393767.0), Ok(()));
    }

    #[test]
    fn unbound_claims_are_bounded_and_forgotten_after_the_claim_ttl() {
        let mut ca =
            CertificateAuthority::new(b"secret".to_vec(), 86400.0).with_claim_limits(10.0, 2);
        let first = ca.claim("a", 1, false, 1000.0).unwrap();
        ca.claim("b", 1, false, 1000.0).unwrap();
        assert_eq!(
            ca.claim("c", 1, false, 1001.0),
            Err(CertificateError::TooManyClaims(2))
        );
        // Past the claim's time, nobody registered "a": it no longer holds the id.
        let second = ca.claim("a", 2, false, 1011.0).unwrap();
        ca.claim("c", 2, false, 1011.0).unwrap();
        assert_eq!(ca.claims_held(), 2, "the swept claims are gone");
        assert_eq!(ca.validate(&first, 1012.0), Err(CertificateError::Revoked));
        assert_eq!(ca.validate(&second, 1012.0), Ok("a".to_owned()));
    }

    #[test]
    fn a_registration_without_the_claim_voids_a_strangers_certificate_while_it_lasts() {
        let mut ca =
            CertificateAuthority::new(b"secret".to_vec(), 86400.0).with_claim_limits(10.0, 100);
        let preclaimed = ca.claim("bob", 66, false, 1000.0).unwrap();
        ca.registered("bob", 7, None);
        assert_eq!(
            ca.validate(&preclaimed, 1001.0),
            Err(CertificateError::Revoked)
        );
        assert_eq!(ca.claims_held(), 1);
        ca.released("bob");
        assert_eq!(ca.claims_held(), 0);
        assert_eq!(ca.validate(&preclaimed, 1001.0), Ok("bob".to_owned()));
    }

    #[test]
    fn a_registration_with_the_claim_binds_it_past_the_claim_ttl() {
        let mut ca =
            CertificateAuthority::new(b"secret".to_vec(), 86400.0).with_claim_limits(10.0, 1);
        let cert = ca.claim("alice", 1, false, 1000.0).unwrap();
        let hash = cert["certificate_hash"].as_str().unwrap().to_owned();
        ca.registered("alice", 2, Some(&hash));
        // Bound: no longer counted against the unbound budget, still current later.
        ca.claim("bob", 3, false, 1001.0).unwrap();
        assert!(matches!(
            ca.claim("alice", 4, false, 5000.0),
            Err(CertificateError::AlreadyClaimed(_))
        ));
        assert_eq!(ca.validate(&cert, 5000.0), Ok("alice".to_owned()));
    }
}
