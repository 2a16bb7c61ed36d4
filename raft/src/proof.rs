//! Admin request proofs: an admin signs each request with the key of its certificate, so that
//! a node that forwards the request to the leader cannot forge or alter one.
//!
//! `spacectl` talks to any node; a mutation reaching a follower is forwarded to the leader over
//! the nodes' own connection. Without a proof the leader would act on the follower's word, and
//! any node certificate would carry an admin's power. With it, the follower hands the leader
//! the admin's certificate chain (as TLS verified it) and the request as the admin sent it
//! (signed bytes, time, nonce, signature), and the leader checks all of it itself: the chain
//! under the cluster CA with an admin identity, the signature by that certificate's key over
//! exactly those bytes, the time within [`PROOF_WINDOW_MS`] of its clock, and the nonce not
//! seen before in that window (see [`ReplayGuard`]).

use std::collections::{BTreeMap, VecDeque};

use rustls::SignatureScheme;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::pki::{Identity, PkiError, TlsMaterial, identity_of_cert};

/// Separates these signatures from any other use of the key (TLS signs other contexts).
const CONTEXT: &[u8] = b"spaced admin request proof v1\0";

/// How far an admin's clock may be from the leader's, either way.
pub const PROOF_WINDOW_MS: u64 = 5 * 60 * 1000;

/// Nonces remembered at most (a burst beyond this refuses new requests until the oldest age
/// out of the window, rather than forgetting one that could be replayed).
pub const MAX_REMEMBERED: usize = 100_000;

/// The bytes an admin signs: the context, its clock, a random nonce, the request.
pub fn message(at_ms: u64, nonce: u64, request: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 16 + request.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&at_ms.to_be_bytes());
    m.extend_from_slice(&nonce.to_be_bytes());
    m.extend_from_slice(request);
    m
}

/// Why a proof was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// The key cannot sign.
    #[error("cannot sign with this certificate's key: {0}")]
    CannotSign(String),
    /// No certificate came with the request.
    #[error("no admin certificate came with the request")]
    NoCertificate,
    /// The certificate does not chain to the cluster CA (or has expired).
    #[error("the certificate is not valid under the cluster CA: {0}")]
    NotUnderCa(String),
    /// The certificate was revoked.
    #[error("the certificate is revoked")]
    Revoked,
    /// The certificate is valid but not an admin's.
    #[error("{0} is not an admin: only admin certificates may sign admin requests")]
    NotAdmin(Identity),
    /// The certificate does not say who it is.
    #[error(transparent)]
    Identity(#[from] PkiError),
    /// The signature is not that certificate's over these bytes.
    #[error("the signature does not match the request and the admin certificate")]
    BadSignature,
    /// The signature scheme is unknown here.
    #[error("unsupported signature scheme {0:#06x}")]
    UnsupportedScheme(u16),
    /// The admin's clock differs from the leader's by more than the window.
    #[error(
        "the request was signed at {at_ms} ms, {skew_ms} ms from this node's clock (at most {PROOF_WINDOW_MS} ms): check the clocks"
    )]
    Stale {
        /// When it says it was signed.
        at_ms: u64,
        /// How far from now.
        skew_ms: u64,
    },
    /// The same signed request was presented before.
    #[error("this signed request was already carried out (a replay)")]
    Replay,
    /// Too many requests in the window to remember them all.
    #[error("too many signed requests in the last {PROOF_WINDOW_MS} ms; try again shortly")]
    TooMany,
}

/// A signature with its scheme (as TLS numbers schemes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    /// `SignatureScheme` as its TLS code point.
    pub scheme: u16,
    /// The signature bytes.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// Signs `msg` with the key of `tls`.
pub fn sign(tls: &TlsMaterial, msg: &[u8]) -> Result<Signature, ProofError> {
    let key = tls
        .provider
        .key_provider
        .load_private_key(tls.key.clone_key())
        .map_err(|e| ProofError::CannotSign(e.to_string()))?;
    let offered = [
        SignatureScheme::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::RSA_PSS_SHA256,
    ];
    let signer = key
        .choose_scheme(&offered)
        .ok_or_else(|| ProofError::CannotSign("no supported signature scheme".into()))?;
    let bytes = signer
        .sign(msg)
        .map_err(|e| ProofError::CannotSign(e.to_string()))?;
    Ok(Signature {
        scheme: u16::from(signer.scheme()),
        bytes,
    })
}

/// A random nonce from the provider's secure random source.
pub fn nonce(tls: &TlsMaterial) -> Result<u64, ProofError> {
    let mut b = [0u8; 8];
    tls.provider
        .secure_random
        .fill(&mut b)
        .map_err(|_| ProofError::CannotSign("no random numbers".into()))?;
    Ok(u64::from_be_bytes(b))
}

/// Checks that `chain` (DER, leaf first) is an admin certificate under the CA of `tls`, valid
/// now, and that its key made `sig` over `msg`; returns the admin's name.
pub fn verify(
    tls: &TlsMaterial,
    chain: &[Vec<u8>],
    msg: &[u8],
    sig: &Signature,
) -> Result<String, ProofError> {
    let (leaf, rest) = chain.split_first().ok_or(ProofError::NoCertificate)?;
    let leaf = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = rest
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), tls.provider.clone())
            .build()
            .map_err(|e| ProofError::NotUnderCa(e.to_string()))?;
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .map_err(|e| ProofError::NotUnderCa(e.to_string()))?;
    if tls.revoked.is_revoked(&leaf) {
        return Err(ProofError::Revoked);
    }
    let name = match identity_of_cert(&leaf)? {
        Identity::Admin(name) => name,
        other => return Err(ProofError::NotAdmin(other)),
    };
    let scheme = SignatureScheme::from(sig.scheme);
    let algorithms = tls
        .provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, algs)| *algs)
        .ok_or(ProofError::UnsupportedScheme(sig.scheme))?;
    let cert = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| ProofError::NotUnderCa(e.to_string()))?;
    if algorithms
        .iter()
        .any(|alg| cert.verify_signature(*alg, msg, &sig.bytes).is_ok())
    {
        Ok(name)
    } else {
        Err(ProofError::BadSignature)
    }
}

/// The nonces of the proofs accepted within the window, so none is accepted twice. In memory:
/// a new leader starts empty, so a request signed in the last window could be replayed once to
/// it (by a member node that saw it; an outsider has no connection to replay it on).
#[derive(Default)]
pub struct ReplayGuard {
    seen: BTreeMap<(String, u64), u64>,
    order: VecDeque<(u64, String, u64)>,
}

impl ReplayGuard {
    /// Accepts a proof by `admin` signed at `at_ms` with `nonce` at local time `now_ms`, or says
    /// why not. Forgets proofs older than the window.
    pub fn admit(
        &mut self,
        admin: &str,
        at_ms: u64,
        nonce: u64,
        now_ms: u64,
    ) -> Result<(), ProofError> {
        let skew_ms = now_ms.abs_diff(at_ms);
        if skew_ms > PROOF_WINDOW_MS {
            return Err(ProofError::Stale { at_ms, skew_ms });
        }
        while let Some((at, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= 2 * PROOF_WINDOW_MS {
                break;
            }
            if let Some((_, who, n)) = self.order.pop_front() {
                self.seen.remove(&(who, n));
            }
        }
        let key = (admin.to_string(), nonce);
        if self.seen.contains_key(&key) {
            return Err(ProofError::Replay);
        }
        if self.seen.len() >= MAX_REMEMBERED {
            return Err(ProofError::TooMany);
        }
        self.seen.insert(key, at_ms);
        self.order.push_back((now_ms, admin.to_string(), nonce));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{TlsPaths, init_ca, issue};

    fn material(dir: &std::path::Path, name: &str, admin: bool) -> TlsMaterial {
        let files = issue(dir, name, admin).unwrap();
        TlsMaterial::load(&TlsPaths {
            ca: dir.join("ca.pem"),
            cert: files.cert,
            key: files.key,
        })
        .unwrap()
    }

    fn chain_of(tls: &TlsMaterial) -> Vec<Vec<u8>> {
        tls.chain.iter().map(|c| c.as_ref().to_vec()).collect()
    }

    #[test]
    fn only_an_admin_of_this_ca_can_sign_a_request_the_leader_accepts() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let leader = material(dir.path(), "n1", false);
        let admin = material(dir.path(), "ops", true);
        let node = material(dir.path(), "n2", false);
        let other = tempfile::tempdir().unwrap();
        init_ca(other.path()).unwrap();
        let stranger = material(other.path(), "ops", true);

        let msg = message(1_000, 7, b"node remove n3");
        let sig = sign(&admin, &msg).unwrap();
        assert_eq!(
            verify(&leader, &chain_of(&admin), &msg, &sig).unwrap(),
            "ops"
        );

        // Altered bytes, time or nonce: the signature no longer matches.
        for altered in [
            message(1_000, 7, b"node remove n1"),
            message(1_001, 7, b"node remove n3"),
            message(1_000, 8, b"node remove n3"),
        ] {
            assert!(matches!(
                verify(&leader, &chain_of(&admin), &altered, &sig),
                Err(ProofError::BadSignature)
            ));
        }
        // A node signing for itself, with its own certificate: not an admin.
        let forged = sign(&node, &msg).unwrap();
        assert!(matches!(
            verify(&leader, &chain_of(&node), &msg, &forged),
            Err(ProofError::NotAdmin(Identity::Node(n))) if n == "n2"
        ));
        // A node's signature presented with the admin's certificate.
        assert!(matches!(
            verify(&leader, &chain_of(&admin), &msg, &forged),
            Err(ProofError::BadSignature)
        ));
        // An admin of another CA.
        let foreign = sign(&stranger, &msg).unwrap();
        assert!(matches!(
            verify(&leader, &chain_of(&stranger), &msg, &foreign),
            Err(ProofError::NotUnderCa(_))
        ));
        assert!(matches!(
            verify(&leader, &[], &msg, &sig),
            Err(ProofError::NoCertificate)
        ));
        let unknown = Signature {
            scheme: 0xfefe,
            bytes: sig.bytes.clone(),
        };
        assert!(matches!(
            verify(&leader, &chain_of(&admin), &msg, &unknown),
            Err(ProofError::UnsupportedScheme(0xfefe))
        ));
    }

    #[test]
    fn a_proof_is_accepted_once_and_only_near_the_leaders_clock() {
        let mut g = ReplayGuard::default();
        let now = 10 * PROOF_WINDOW_MS;
        g.admit("ops", now - 1_000, 1, now).unwrap();
        assert!(matches!(
            g.admit("ops", now - 1_000, 1, now + 5),
            Err(ProofError::Replay)
        ));
        // Another admin's nonce is another proof.
        g.admit("dev", now - 1_000, 1, now).unwrap();
        assert!(matches!(
            g.admit("ops", now - PROOF_WINDOW_MS - 1, 2, now),
            Err(ProofError::Stale { .. })
        ));
        assert!(matches!(
            g.admit("ops", now + PROOF_WINDOW_MS + 1, 3, now),
            Err(ProofError::Stale { .. })
        ));
        // Long after, the nonce is forgotten, and a replay of it is stale anyway.
        let later = now + 3 * PROOF_WINDOW_MS;
        assert!(matches!(
            g.admit("ops", now - 1_000, 1, later),
            Err(ProofError::Stale { .. })
        ));
        g.admit("ops", later, 4, later).unwrap();
        assert_eq!(g.seen.len(), 1);
    }
}
