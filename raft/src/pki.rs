//! Cluster PKI: CA and certificate issuance, key loading, and mutual-TLS QUIC configs with peer identities.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore};
use rustls::{SignatureScheme, sign::CertifiedKey};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::GeneralName;

/// DNS suffix of node certificates, so a SAN says unambiguously "this is node X".
pub const NODE_DOMAIN: &str = "node.spaced";
/// DNS suffix of admin certificates, so admins can never pass as nodes.
pub const ADMIN_DOMAIN: &str = "admin.spaced";
/// ALPN for node-to-node Raft traffic, so one port can serve both protocols. Its version is
/// the data format ([`crate::store::DATA_FORMAT`]): log entries and snapshots travel in the
/// encoding the store keeps, so nodes of different formats must not talk. A node of another
/// format fails the handshake ([`explain_connection_error`]) instead of misreading the log.
pub const ALPN_RAFT: &[u8] = b"spaced-raft/7";
/// The Raft protocol of the previous data format ([`crate::store::PREVIOUS_FORMAT`]), which
/// this build also speaks, so a cluster is upgraded one node at a time: format 7 only adds
/// commands, which the fabric refuses until every node runs format 7 (see
/// `spaced_fabric::SET_COMMANDS_FORMAT`), so what travels meanwhile reads the same in both.
/// Once every node has recorded format 7, a peer on this protocol is refused (see
/// [`crate::network::QuicNetwork::refuse_previous`]): it could not decode the log any more.
pub const ALPN_RAFT_PREVIOUS: &[u8] = b"spaced-raft/6";
/// The Raft protocols a node offers when it dials, newest first.
pub const ALPNS_RAFT: &[&[u8]] = &[ALPN_RAFT, ALPN_RAFT_PREVIOUS];
/// ALPN for admin CLI traffic, distinguishing it from Raft on the same port. Bump its version
/// whenever the encoding of the admin requests or replies changes, so a `spacectl` of another
/// build is refused at the handshake instead of misreading replies.
pub const ALPN_ADMIN: &[u8] = b"spaced-admin/7";

/// QUIC's code for the TLS alert `no_application_protocol` (RFC 9001 §4.8: 0x100 + alert 120):
/// the two ends share no ALPN.
fn no_shared_protocol() -> quinn::TransportErrorCode {
    quinn::TransportErrorCode::crypto(120)
}

/// Whether a handshake failed because the two ends share no protocol version, which means
/// they are different spaced builds (or not spaced at all).
pub fn is_protocol_mismatch(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code == no_shared_protocol(),
        quinn::ConnectionError::TransportError(e) => e.code == no_shared_protocol(),
        _ => false,
    }
}

/// A failed connection, said so an operator can act on it: a protocol mismatch names the
/// protocol this build speaks (`alpn`) and says what to do.
pub fn explain_connection_error(error: &quinn::ConnectionError, alpn: &[u8]) -> String {
    if is_protocol_mismatch(error) {
        format!(
            "it does not speak {} ({error}): it runs another spaced build; nodes and spacectl \
             must run builds of the same protocol version",
            String::from_utf8_lossy(alpn)
        )
    } else {
        error.to_string()
    }
}

/// File name of the CA certificate inside a PKI directory.
const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a PKI directory.
const CA_KEY_FILE: &str = "ca.key";
/// Subject CN of the cluster CA.
const CA_COMMON_NAME: &str = "spaced cluster CA";
/// Validity of the CA and the upper bound for leaf certificates (about 10 years).
const VALIDITY: Duration = Duration::from_secs(3652 * 24 * 3600);
/// Backdating of `not_before`, so peers with slightly lagging clocks accept fresh certs.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Longest allowed node/admin name (one DNS label).
const MAX_NAME_LEN: usize = 63;

/// Everything that can go wrong with keys and certificates; each variant says which file or name.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A node/admin name is unusable as a DNS label.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A file we must not overwrite is already there.
    #[error("refusing to overwrite existing file {}", path.display())]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file we need to read does not exist.
    #[error("file {} does not exist", path.display())]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// Any other filesystem error.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What we were doing ("reading", "writing", "creating directory").
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file is not (valid) PEM.
    #[error("{} is not a valid PEM file: {detail}", path.display())]
    NotPem {
        /// The offending file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// A PEM file holds no certificate where one is required.
    #[error("{} contains no CERTIFICATE section", path.display())]
    NoCertificate {
        /// The offending file.
        path: PathBuf,
    },
    /// A PEM file holds no private key where one is required.
    #[error("{} contains no private key section", path.display())]
    NoPrivateKey {
        /// The offending file.
        path: PathBuf,
    },
    /// A PEM file holds more than one private key, so which one to use is unclear.
    #[error("{} contains more than one private key", path.display())]
    MultipleKeys {
        /// The offending file.
        path: PathBuf,
    },
    /// A certificate could not be parsed as X.509.
    #[error("cannot parse certificate {what}: {detail}")]
    BadCertificate {
        /// Which certificate (file path or "peer certificate").
        what: String,
        /// What the parser said.
        detail: String,
    },
    /// A private key could not be used.
    #[error("cannot use private key {}: {detail}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// A CA certificate could not be used as a trust anchor.
    #[error("CA certificate in {} is unusable: {source}", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The CA certificate has expired (or expires right now), so nothing can be issued.
    #[error("CA certificate {} has expired", path.display())]
    CaExpired {
        /// The CA file.
        path: PathBuf,
    },
    /// Our own certificate does not chain to the configured CA.
    #[error("certificate {} is not valid under CA {}: {source}", cert.display(), ca.display())]
    NotSignedByCa {
        /// Our certificate file.
        cert: PathBuf,
        /// The CA file.
        ca: PathBuf,
        /// Why verification failed.
        source: rustls::Error,
    },
    /// A certificate carries no `<name>.node.spaced` / `<name>.admin.spaced` SAN.
    #[error(
        "certificate {what} has no SAN of the form <name>.{NODE_DOMAIN} or <name>.{ADMIN_DOMAIN}"
    )]
    NoIdentity {
        /// Which certificate.
        what: String,
    },
    /// A certificate carries several spaced identities, so who it is is unclear.
    #[error("certificate {what} has several spaced identities: {found}")]
    AmbiguousIdentity {
        /// Which certificate.
        what: String,
        /// The identities found, for diagnosis.
        found: String,
    },
    /// The peer of a connection presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// rcgen failed to generate a key or certificate.
    #[error("generating {what}: {source}")]
    Generate {
        /// What we were generating.
        what: String,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// The system clock is before 1970, so validity periods make no sense.
    #[error("system clock is before the Unix epoch")]
    Clock,
    /// Building a rustls configuration failed.
    #[error("building TLS {what}: {source}")]
    Tls {
        /// Which configuration.
        what: &'static str,
        /// What rustls said.
        source: rustls::Error,
    },
    /// Building a rustls certificate verifier failed.
    #[error("building {what} certificate verifier: {source}")]
    Verifier {
        /// Which verifier.
        what: &'static str,
        /// What rustls said.
        source: rustls::server::VerifierBuilderError,
    },
    /// The rustls configuration is unusable for QUIC.
    #[error("TLS {what} config unusable for QUIC: {source}")]
    Quic {
        /// Which configuration.
        what: &'static str,
        /// What quinn said.
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },
}

/// Who is on the other end of a TLS session, read from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A cluster node, by node name.
    Node(String),
    /// An administrator, by admin name.
    Admin(String),
}

impl Identity {
    /// The bare name, for logs and lookups that do not care about the kind.
    pub fn name(&self) -> &str {
        match self {
            Identity::Node(n) | Identity::Admin(n) => n,
        }
    }

    /// The SAN DNS name that certifies this identity.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Node(n) => format!("{n}.{NODE_DOMAIN}"),
            Identity::Admin(n) => format!("{n}.{ADMIN_DOMAIN}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node {n}"),
            Identity::Admin(n) => write!(f, "admin {n}"),
        }
    }
}

/// TLS server name to dial a node by name, so callers need not format it themselves.
pub fn node_server_name(name: &str) -> String {
    format!("{name}.{NODE_DOMAIN}")
}

/// Node/admin names: 1..=63 chars of [a-z0-9-], not starting/ending with '-'.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason| {
        Err(PkiError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    Ok(())
}

/// Paths returned by [`issue`], so the CLI can tell the operator what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    /// The new certificate (PEM).
    pub cert: PathBuf,
    /// The new private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// Creates dir if needed, writes `ca.pem` (cert) and `ca.key` (private key, file mode 0600).
/// Refuses (error) if ca.pem or ca.key already exists. CA: self-signed, CN "spaced cluster CA",
/// is_ca constrained (path length 0), 10-year validity, ECDSA P-256.
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    create_dir(dir)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        PkiError::Generate {
            what: "CA key".into(),
            source,
        }
    })?;
    let now = unix_now()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now.saturating_sub(CLOCK_SKEW), now + VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "CA certificate".into(),
            source,
        })?;

    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    tracing::info!(dir = %dir.display(), "created cluster CA");
    Ok(())
}

/// Loads ca.pem/ca.key from dir and issues a leaf cert signed by the CA: node cert →
/// `<name>.pem`/`<name>.key`; admin cert → `admin-<name>.pem`/`admin-<name>.key`.
/// SAN DNS = `"<name>.node.spaced"` or `"<name>.admin.spaced"`, CN = name. Extended key usage:
/// server+client auth for nodes, client auth for admins. Refuses to overwrite existing files.
/// Returns the paths written.
pub fn issue(dir: &Path, name: &str, admin: bool) -> Result<IssuedFiles, PkiError> {
    validate_name(name)?;
    let (stem, identity) = if admin {
        (format!("admin-{name}"), Identity::Admin(name.to_string()))
    } else {
        (name.to_string(), Identity::Node(name.to_string()))
    };
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;

    let ca_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_der =
        read_certs(&ca_path)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::NoCertificate {
                path: ca_path.clone(),
            })?;
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadKey {
        path: ca_key_path.clone(),
        detail: e.to_string(),
    })?;

    let (_, ca) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|e| PkiError::BadCertificate {
            what: ca_path.display().to_string(),
            detail: e.to_string(),
        })?;
    if ca.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        return Err(PkiError::BadKey {
            path: ca_key_path,
            detail: format!("does not belong to CA certificate {}", ca_path.display()),
        });
    }
    let ca_subject_raw = ca.subject().as_raw().to_vec();
    let ca_not_after = u64::try_from(ca.validity().not_after.timestamp()).unwrap_or(0);
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn_from_x509(ca.subject(), &ca_path)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let now = unix_now()?;
    let ca_end = Duration::from_secs(ca_not_after);
    if ca_end <= now {
        return Err(PkiError::CaExpired { path: ca_path });
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
        PkiError::Generate {
            what: format!("key for {name:?}"),
            source,
        }
    })?;
    let san = identity.dns_name();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName(san.clone().try_into().map_err(
        |source| PkiError::Generate {
            what: format!("SAN {san:?}"),
            source,
        },
    )?)];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if admin {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(
        &mut params,
        now.saturating_sub(CLOCK_SKEW),
        (now + VALIDITY).min(ca_end),
    );
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: format!("certificate for {name:?}"),
            source,
        })?;

    // The issuer name we reconstructed must match the CA subject byte for byte, or the
    // chain would not verify; catch that here instead of at the first handshake.
    let (_, leaf) =
        x509_parser::parse_x509_certificate(cert.der()).map_err(|e| PkiError::BadCertificate {
            what: format!("newly issued certificate for {name:?}"),
            detail: e.to_string(),
        })?;
    if leaf.issuer().as_raw() != ca_subject_raw.as_slice() {
        return Err(PkiError::BadCertificate {
            what: ca_path.display().to_string(),
            detail: "CA subject name could not be reproduced for issuing".into(),
        });
    }

    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    tracing::info!(%identity, cert = %cert_path.display(), "issued certificate");
    Ok(IssuedFiles {
        cert: cert_path,
        key: key_path,
    })
}

/// Paths as given in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA certificate(s) we trust (PEM).
    pub ca: PathBuf,
    /// Our own certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Our own private key (PEM).
    pub key: PathBuf,
}

/// The serials of revoked certificates (the number in lowercase hex, as the fabric keeps
/// them), shared by this process's verifiers and connection loops. Cloning shares it.
#[derive(Clone, Default, Debug)]
pub struct Revoked(Arc<std::sync::RwLock<std::collections::BTreeSet<String>>>);

impl Revoked {
    /// Whether the certificate `der` is revoked (one that does not parse is not ours to judge:
    /// the verifiers refuse it anyway).
    pub fn is_revoked(&self, der: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        match serial_of(der) {
            Ok(serial) => self.contains(&serial),
            Err(_) => false,
        }
    }

    /// Whether no certificate is revoked (the common case, checked without parsing anything).
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Whether `serial` is revoked.
    pub fn contains(&self, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// Replaces the set (from the fabric); `true` if it changed.
    pub fn replace(&self, serials: std::collections::BTreeSet<String>) -> bool {
        let mut set = self.0.write().unwrap_or_else(|p| p.into_inner());
        if *set == serials {
            return false;
        }
        *set = serials;
        true
    }
}

/// A certificate's serial number as the fabric keeps it: the number in lowercase hex,
/// without leading zeros.
pub fn serial_of(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate {
            what: "certificate".into(),
            detail: e.to_string(),
        })?;
    Ok(cert.tbs_certificate.serial.to_str_radix(16))
}

/// The serial and identity of the first certificate in the PEM file `path` (for `spacectl pki
/// revoke`).
pub fn describe_cert_file(path: &Path) -> Result<(String, Identity), PkiError> {
    let certs = read_certs(path)?;
    let leaf = certs.first().ok_or_else(|| PkiError::NoCertificate {
        path: path.to_path_buf(),
    })?;
    let what = path.display().to_string();
    let serial = serial_of(leaf).map_err(|e| match e {
        PkiError::BadCertificate { detail, .. } => PkiError::BadCertificate {
            what: what.clone(),
            detail,
        },
        other => other,
    })?;
    Ok((serial, identity_of(leaf, &what)?))
}

/// Loaded and checked key material of this process.
pub struct TlsMaterial {
    /// Trust anchors: peers must chain to one of these.
    pub(crate) roots: Arc<RootCertStore>,
    /// Our certificate chain, leaf first, as presented to peers.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Our private key, matching `chain[0]`.
    pub(crate) key: PrivateKeyDer<'static>,
    /// Who we are according to our own certificate.
    identity: Identity,
    /// The crypto provider used for everything (always ring, never the process default).
    pub(crate) provider: Arc<CryptoProvider>,
    /// Certificates refused although the CA signed them.
    pub(crate) revoked: Revoked,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            provider: self.provider.clone(),
            revoked: self.revoked.clone(),
        }
    }
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("roots", &self.roots.len())
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads the PEM files; errors name the file and the problem (missing, not PEM, no cert,
    /// no key). Also checks that the key matches the cert, that the own cert is signed by the
    /// CA, and parses its Identity (error if neither a node nor an admin SAN).
    pub fn load(paths: &TlsPaths) -> Result<Self, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let ca_certs = read_certs(&paths.ca)?;
        let mut roots = RootCertStore::empty();
        for ca in ca_certs {
            roots.add(ca).map_err(|source| PkiError::BadCa {
                path: paths.ca.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);

        let chain = read_certs(&paths.cert)?;
        let key = read_key(&paths.key)?;
        let Some(leaf) = chain.first() else {
            return Err(PkiError::NoCertificate {
                path: paths.cert.clone(),
            });
        };

        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|source| {
            match source {
                rustls::Error::InconsistentKeys(_) => PkiError::KeyMismatch {
                    cert: paths.cert.clone(),
                    key: paths.key.clone(),
                    source,
                },
                other => PkiError::BadKey {
                    path: paths.key.clone(),
                    detail: other.to_string(),
                },
            }
        })?;

        let identity = identity_of(leaf, &paths.cert.display().to_string())?;

        // Both node and admin certs carry clientAuth, so the client verifier checks the chain,
        // validity period and key usage of either kind.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| PkiError::Verifier {
                what: "own",
                source,
            })?;
        verifier
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|source| PkiError::NotSignedByCa {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                source,
            })?;

        Ok(Self {
            roots,
            chain,
            key,
            identity,
            provider,
            revoked: Revoked::default(),
        })
    }

    /// Who this process is, so it can tell peers and logs.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// This material refusing the serials of `revoked` (share a running node's set with
    /// material loaded again).
    pub fn with_revoked(mut self, revoked: Revoked) -> Self {
        self.revoked = revoked;
        self
    }

    /// When our own certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        let leaf = self.chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// The serial of our own certificate.
    pub fn serial(&self) -> Result<String, PkiError> {
        match self.chain.first() {
            Some(leaf) => serial_of(leaf),
            None => Err(PkiError::NoPeerCertificate),
        }
    }

    /// The revoked serials this material's verifiers refuse; the node keeps it in step with
    /// the fabric.
    pub fn revoked(&self) -> &Revoked {
        &self.revoked
    }

    /// Our certificate chain as DER, leaf first (as peers see it).
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        self.chain.iter().map(|c| c.as_ref().to_vec()).collect()
    }

    /// This process's certificate and key, trusting only the CA certificate(s) in `ca` (a
    /// peer site's, for the disaster-recovery link): its verifiers accept that CA's nodes and
    /// nobody else, and refuse no serial (the peer site revokes its own).
    pub fn trusting(&self, ca: &Path) -> Result<TlsMaterial, PkiError> {
        self.trusting_all(&[ca])
    }

    /// [`trusting`](Self::trusting) the CA certificates of every file in `cas` (a DR
    /// witness, which both sites of a pair reach).
    pub fn trusting_all(&self, cas: &[&Path]) -> Result<TlsMaterial, PkiError> {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|source| PkiError::BadCa {
                    path: ca.to_path_buf(),
                    source,
                })?;
            }
        }
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            revoked: Revoked::default(),
            ..self.clone()
        })
    }

    /// QUIC server config: requires a client certificate chained to the CA and carrying a
    /// spaced identity (rustls WebPkiClientVerifier plus a SAN check), ALPN =
    /// [ALPN_RAFT, ALPN_RAFT_PREVIOUS, ALPN_ADMIN], transport = the given config.
    pub fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, PkiError> {
        self.server_config_for(transport, &[ALPN_RAFT, ALPN_RAFT_PREVIOUS, ALPN_ADMIN])
    }

    /// [`server_config`](Self::server_config) speaking the protocols `alpns`.
    pub fn server_config_for(
        &self,
        transport: Arc<quinn::TransportConfig>,
        alpns: &[&[u8]],
    ) -> Result<quinn::ServerConfig, PkiError> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|source| PkiError::Verifier {
                    what: "client",
                    source,
                })?;
        let verifier = Arc::new(SpacedClientVerifier {
            inner,
            revoked: self.revoked.clone(),
        });
        let mut tls = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| PkiError::Tls {
                what: "server",
                source,
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| PkiError::Tls {
                what: "server",
                source,
            })?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|source| {
            PkiError::Quic {
                what: "server",
                source,
            }
        })?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport);
        Ok(config)
    }

    /// QUIC client config presenting our own cert, with ALPN `alpn`, that accepts only node
    /// certificates chained to the CA. Dial with server_name `"<name>.node.spaced"` to require
    /// that exact node, or with [`NODE_DOMAIN`] itself to accept any valid node.
    pub fn client_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, PkiError> {
        self.client_config_for(&[alpn], transport)
    }

    /// [`client_config`](Self::client_config) offering the protocols `alpns`, preferred first.
    pub fn client_config_for(
        &self,
        alpns: &[&[u8]],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, PkiError> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|source| PkiError::Verifier {
                    what: "server",
                    source,
                })?;
        let verifier = Arc::new(NodeServerVerifier {
            inner,
            revoked: self.revoked.clone(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| PkiError::Tls {
                what: "client",
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| PkiError::Tls {
                what: "client",
                source,
            })?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|source| {
            PkiError::Quic {
                what: "client",
                source,
            }
        })?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport);
        Ok(config)
    }
}

/// Identity of the peer of an established quinn connection, from its verified leaf cert.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, PkiError> {
    let any = conn.peer_identity().ok_or(PkiError::NoPeerCertificate)?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PkiError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(PkiError::NoPeerCertificate)?;
    identity_of(leaf, "peer certificate")
}

/// The verified certificate chain of the peer of an established quinn connection, leaf
/// first, as DER (what a node hands the leader with an admin request it forwards).
pub fn peer_chain(conn: &quinn::Connection) -> Result<Vec<Vec<u8>>, PkiError> {
    let any = conn.peer_identity().ok_or(PkiError::NoPeerCertificate)?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PkiError::NoPeerCertificate)?;
    Ok(certs.iter().map(|c| c.as_ref().to_vec()).collect())
}

/// Identity from a DER cert (used by peer_identity, the verifiers and in tests).
pub fn identity_of_cert(der: &[u8]) -> Result<Identity, PkiError> {
    identity_of(der, "given certificate")
}

/// Parses the spaced identity out of the SANs of `der`; `what` names the cert in errors.
fn identity_of(der: &[u8], what: &str) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate {
            what: what.to_string(),
            detail: format!("subjectAltName: {e}"),
        })?;
    let mut found: Vec<Identity> = Vec::new();
    for general in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        let GeneralName::DNSName(dns) = general else {
            continue;
        };
        let candidate = if let Some(n) = strip_domain(dns, NODE_DOMAIN) {
            Identity::Node(n.to_string())
        } else if let Some(n) = strip_domain(dns, ADMIN_DOMAIN) {
            Identity::Admin(n.to_string())
        } else {
            continue;
        };
        if validate_name(candidate.name()).is_ok() && !found.contains(&candidate) {
            found.push(candidate);
        }
    }
    match found.len() {
        0 => Err(PkiError::NoIdentity {
            what: what.to_string(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(PkiError::AmbiguousIdentity {
            what: what.to_string(),
            found: found
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `"<x>.<domain>"` → `Some("<x>")`; anything else → None.
fn strip_domain<'a>(dns: &'a str, domain: &str) -> Option<&'a str> {
    dns.strip_suffix(domain)?.strip_suffix('.')
}

/// Client-side verifier: chain and signatures via webpki, plus "the server is a node" and,
/// for the wildcard dial name [`NODE_DOMAIN`], "any node will do".
#[derive(Debug)]
struct NodeServerVerifier {
    /// Does the real work: chain to the CA, validity, serverAuth EKU, hostname, signatures.
    inner: Arc<WebPkiServerVerifier>,
    /// Serials refused although the CA signed them.
    revoked: Revoked,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.revoked.is_revoked(end_entity) {
            tracing::warn!("refusing a server whose certificate is revoked");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        let identity = identity_of(end_entity, "server certificate").map_err(|e| {
            tracing::debug!(error = %e, "rejecting server certificate");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        let Identity::Node(node) = &identity else {
            tracing::debug!(%identity, "rejecting server: not a node certificate");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        };
        let wanted = match server_name {
            ServerName::DnsName(dns) => Some(dns.as_ref()),
            _ => None,
        };
        match wanted {
            Some(dns) if dns.eq_ignore_ascii_case(NODE_DOMAIN) => {
                // Caller does not know the node name: check the cert against its own node name.
                let own = ServerName::try_from(node_server_name(node)).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                })?;
                self.inner
                    .verify_server_cert(end_entity, intermediates, &own, ocsp_response, now)
            }
            Some(dns) => {
                // A specific node was asked for: it must be exactly that node's identity, not
                // merely some name the certificate also happens to match.
                if let Some(asked) = strip_domain(&dns.to_ascii_lowercase(), NODE_DOMAIN)
                    && asked != node
                {
                    tracing::debug!(asked, presented = %node, "server is a different node");
                    return Err(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName,
                    ));
                }
                self.inner.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )
            }
            None => self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[TlsDn]> {
        self.inner.root_hint_subjects()
    }
}

/// Server-side verifier: webpki chain check plus "the client has a spaced identity", so every
/// accepted connection has a usable [`peer_identity`].
#[derive(Debug)]
struct SpacedClientVerifier {
    /// Does the real work: chain to the CA, validity, clientAuth EKU, signatures.
    inner: Arc<dyn ClientCertVerifier>,
    /// Serials refused although the CA signed them.
    revoked: Revoked,
}

impl ClientCertVerifier for SpacedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.revoked.is_revoked(end_entity) {
            tracing::warn!("refusing a client whose certificate is revoked");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        identity_of(end_entity, "client certificate").map_err(|e| {
            tracing::debug!(error = %e, "rejecting client certificate");
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// Rebuilds an rcgen name from a parsed X.509 name, so certs we issue name the CA exactly.
fn dn_from_x509(
    name: &x509_parser::x509::X509Name<'_>,
    path: &Path,
) -> Result<DistinguishedName, PkiError> {
    let bad = |detail: String| PkiError::BadCertificate {
        what: path.display().to_string(),
        detail,
    };
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("subject attribute OID too large".into()))?
            .collect();
        let value = attr
            .as_str()
            .map_err(|e| bad(format!("subject attribute: {e}")))?;
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(value.to_string()),
            Tag::PrintableString => DnValue::PrintableString(
                value
                    .try_into()
                    .map_err(|e| bad(format!("subject attribute: {e}")))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                value
                    .try_into()
                    .map_err(|e| bad(format!("subject attribute: {e}")))?,
            ),
            other => return Err(bad(format!("unsupported subject string type {other}"))),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

/// Current time as a duration since the Unix epoch.
fn unix_now() -> Result<Duration, PkiError> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| PkiError::Clock)
}

/// Sets the validity window (as durations since the Unix epoch) without depending on `time`.
fn set_validity(params: &mut CertificateParams, from: Duration, to: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + from;
    params.not_after = epoch + to;
}

/// Errors unless `path` is absent, so we never clobber key material.
fn refuse_existing(path: &Path) -> Result<(), PkiError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(PkiError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Io {
            action: "checking",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `dir` (and parents), private to the owner where supported.
fn create_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| PkiError::Io {
        action: "creating directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes a new file (never overwriting); `secret` files get mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Io {
                action: "writing",
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut file = opts.open(path).map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Writes key then cert; if the cert fails, removes the key so no half pair is left behind.
fn write_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), PkiError> {
    write_new(key_path, key_pem, true)?;
    if let Err(e) = write_new(cert_path, cert_pem, false) {
        if let Err(rm) = fs::remove_file(key_path) {
            tracing::warn!(path = %key_path.display(), error = %rm, "could not remove orphaned key");
        }
        return Err(e);
    }
    Ok(())
}

/// Reads a whole file, mapping "not found" to [`PkiError::Missing`].
fn read_bytes(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            PkiError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            PkiError::Io {
                action: "reading",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Reads a PEM file as text (for rcgen, which wants `&str`).
fn read_text(path: &Path) -> Result<String, PkiError> {
    let bytes = read_bytes(path)?;
    // Validate it is PEM first so the error says "not PEM" rather than a UTF-8 complaint.
    pem_sections(&bytes, path)?;
    String::from_utf8(bytes).map_err(|e| PkiError::NotPem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// All PEM sections of a file's contents; errors if malformed or if there are none at all.
fn pem_sections(bytes: &[u8], path: &Path) -> Result<Vec<(SectionKind, Vec<u8>)>, PkiError> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::NotPem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if sections.is_empty() {
        return Err(PkiError::NotPem {
            path: path.to_path_buf(),
            detail: "no PEM sections found".into(),
        });
    }
    Ok(sections)
}

/// All certificates of a PEM file, in file order; errors if there are none.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read_bytes(path)?;
    let certs: Vec<CertificateDer<'static>> = pem_sections(&bytes, path)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The single private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = read_bytes(path)?;
    let mut keys = pem_sections(&bytes, path)?
        .into_iter()
        .filter_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der));
    let key = keys.next().ok_or_else(|| PkiError::NoPrivateKey {
        path: path.to_path_buf(),
    })?;
    if keys.next().is_some() {
        return Err(PkiError::MultipleKeys {
            path: path.to_path_buf(),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tempfile::TempDir;

    fn paths(dir: &Path, stem: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    fn material(dir: &Path, stem: &str) -> TlsMaterial {
        TlsMaterial::load(&paths(dir, stem)).unwrap()
    }

    fn cluster() -> TempDir {
        let tmp = TempDir::new().unwrap();
        init_ca(tmp.path()).unwrap();
        issue(tmp.path(), "n1", false).unwrap();
        issue(tmp.path(), "n2", false).unwrap();
        issue(tmp.path(), "ops", true).unwrap();
        tmp
    }

    fn transport() -> Arc<quinn::TransportConfig> {
        Arc::new(quinn::TransportConfig::default())
    }

    fn read_der(path: &Path) -> CertificateDer<'static> {
        read_certs(path).unwrap().remove(0)
    }

    /// A server endpoint with `m`'s certificate on a free loopback port.
    fn server_endpoint(m: &TlsMaterial) -> (quinn::Endpoint, SocketAddr) {
        let ep = quinn::Endpoint::server(
            m.server_config(transport()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        (ep, addr)
    }

    /// Dials `addr` (server name `name`) with `m`'s certificate and `alpn` from a fresh client
    /// endpoint: the endpoint (keep it while the connection is used) and the handshake's own
    /// outcome, `None` if it did not end within 5 s.
    async fn handshake(
        m: &TlsMaterial,
        alpn: &[u8],
        addr: SocketAddr,
        name: &str,
    ) -> (
        quinn::Endpoint,
        Option<Result<quinn::Connection, quinn::ConnectionError>>,
    ) {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = ep
            .connect_with(m.client_config(alpn, transport()).unwrap(), addr, name)
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .ok();
        (ep, outcome)
    }

    /// Starts a server; the task yields the identity the server sees for the first peer.
    fn serve(
        m: &TlsMaterial,
    ) -> (
        quinn::Endpoint,
        SocketAddr,
        tokio::task::JoinHandle<Result<Identity, String>>,
    ) {
        let (ep, addr) = server_endpoint(m);
        let ep2 = ep.clone();
        let task = tokio::spawn(async move {
            let incoming = ep2.accept().await.ok_or("endpoint closed")?;
            let conn = incoming.await.map_err(|e| e.to_string())?;
            let id = peer_identity(&conn).map_err(|e| e.to_string())?;
            // Keep the connection up until the client is done with it.
            let _ = conn.closed().await;
            Ok(id)
        });
        (ep, addr, task)
    }

    /// Connects; Ok only if the handshake completes and the connection stays up briefly.
    async fn dial(
        m: &TlsMaterial,
        alpn: &[u8],
        addr: SocketAddr,
        name: &str,
    ) -> Result<Identity, String> {
        let (ep, outcome) = handshake(m, alpn, addr, name).await;
        let conn = outcome
            .ok_or_else(|| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        // The server checks our certificate after we consider the handshake done; give it a
        // moment to refuse.
        if let Ok(reason) = tokio::time::timeout(Duration::from_millis(300), conn.closed()).await {
            return Err(reason.to_string());
        }
        let id = peer_identity(&conn).map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok(id)
    }

    async fn server_result(
        task: tokio::task::JoinHandle<Result<Identity, String>>,
    ) -> Result<Identity, String> {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn init_ca_refuses_second_time_and_protects_key() {
        let tmp = TempDir::new().unwrap();
        let dir = tmp.path().join("pki");
        init_ca(&dir).unwrap();
        let err = init_ca(&dir).unwrap_err();
        assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let ca = read_der(&dir.join("ca.pem"));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        assert!(ca.is_ca());
        let cn = ca
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "spaced cluster CA");
    }

    #[test]
    fn issue_node_and_admin() {
        let tmp = TempDir::new().unwrap();
        init_ca(tmp.path()).unwrap();
        let node = issue(tmp.path(), "n1", false).unwrap();
        assert_eq!(node.cert, tmp.path().join("n1.pem"));
        assert_eq!(node.key, tmp.path().join("n1.key"));
        let admin = issue(tmp.path(), "ops", true).unwrap();
        assert_eq!(admin.cert, tmp.path().join("admin-ops.pem"));
        assert_eq!(admin.key, tmp.path().join("admin-ops.key"));

        let node_der = read_der(&node.cert);
        assert_eq!(
            identity_of_cert(&node_der).unwrap(),
            Identity::Node("n1".into())
        );
        assert_eq!(
            identity_of_cert(&read_der(&admin.cert)).unwrap(),
            Identity::Admin("ops".into())
        );
        let (_, leaf) = x509_parser::parse_x509_certificate(&node_der).unwrap();
        let cn = leaf
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "n1");

        let err = issue(tmp.path(), "n1", false).unwrap_err();
        assert!(matches!(err, PkiError::AlreadyExists { .. }), "{err}");
        assert!(issue(tmp.path(), "Bad", false).is_err());

        assert_eq!(
            material(tmp.path(), "n1").identity(),
            &Identity::Node("n1".into())
        );
        assert_eq!(
            material(tmp.path(), "admin-ops").identity(),
            &Identity::Admin("ops".into())
        );
    }

    #[test]
    fn issue_without_ca_names_file() {
        let tmp = TempDir::new().unwrap();
        let err = issue(tmp.path(), "n1", false).unwrap_err();
        assert!(matches!(err, PkiError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn names() {
        for ok in ["n1", "a", "node-7", &"x".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "UPPER", "-x", "x-", &"x".repeat(64), "a.b", "a_b", "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let tmp = cluster();
        let dir = tmp.path();

        let mut p = paths(dir, "n1");
        p.ca = dir.join("nope.pem");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let mut p = paths(dir, "n1");
        p.key = dir.join("missing.key");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");

        fs::write(dir.join("garbage.pem"), "hello world\n").unwrap();
        let mut p = paths(dir, "n1");
        p.cert = dir.join("garbage.pem");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::NotPem { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        // A key file where a cert is expected, and vice versa.
        let mut p = paths(dir, "n1");
        p.cert = dir.join("n1.key");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("n1.key"), "{err}");
        let mut p = paths(dir, "n1");
        p.key = dir.join("n1.pem");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("n1.pem"), "{err}");

        // Somebody else's key.
        let mut p = paths(dir, "n1");
        p.key = dir.join("n2.key");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");

        // A cert from another CA.
        let other = TempDir::new().unwrap();
        init_ca(other.path()).unwrap();
        let mut p = paths(dir, "n1");
        p.ca = other.path().join("ca.pem");
        let err = TlsMaterial::load(&p).unwrap_err();
        assert!(matches!(err, PkiError::NotSignedByCa { .. }), "{err}");
    }

    #[test]
    fn server_verifier_rejects_admin_and_wrong_node() {
        let tmp = cluster();
        let m = material(tmp.path(), "n2");
        let inner =
            WebPkiServerVerifier::builder_with_provider(m.roots.clone(), m.provider.clone())
                .build()
                .unwrap();
        let v = NodeServerVerifier {
            inner,
            revoked: Revoked::default(),
        };
        let name = |s: &str| ServerName::try_from(s.to_string()).unwrap();
        let n1 = read_der(&tmp.path().join("n1.pem"));
        let ops = read_der(&tmp.path().join("admin-ops.pem"));
        let now = UnixTime::now();
        v.verify_server_cert(&n1, &[], &name("n1.node.spaced"), &[], now)
            .unwrap();
        v.verify_server_cert(&n1, &[], &name(NODE_DOMAIN), &[], now)
            .unwrap();
        assert!(
            v.verify_server_cert(&n1, &[], &name("n3.node.spaced"), &[], now)
                .is_err()
        );
        assert!(
            v.verify_server_cert(&ops, &[], &name(NODE_DOMAIN), &[], now)
                .is_err()
        );
        assert!(
            v.verify_server_cert(&ops, &[], &name("ops.admin.spaced"), &[], now)
                .is_err()
        );
    }

    #[tokio::test]
    async fn node_to_node_by_name() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let seen = dial(
            &material(tmp.path(), "n2"),
            ALPN_RAFT,
            addr,
            "n1.node.spaced",
        )
        .await;
        assert_eq!(seen.unwrap(), Identity::Node("n1".into()));
        assert_eq!(
            server_result(task).await.unwrap(),
            Identity::Node("n2".into())
        );
    }

    #[tokio::test]
    async fn wrong_node_name_fails() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let res = dial(
            &material(tmp.path(), "n2"),
            ALPN_RAFT,
            addr,
            "n3.node.spaced",
        )
        .await;
        assert!(res.is_err(), "{res:?}");
        let server = server_result(task).await;
        eprintln!("client: {res:?}; server: {server:?}");
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn any_node_via_node_domain() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let seen = dial(
            &material(tmp.path(), "admin-ops"),
            ALPN_ADMIN,
            addr,
            NODE_DOMAIN,
        )
        .await;
        assert_eq!(seen.unwrap(), Identity::Node("n1".into()));
        assert_eq!(
            server_result(task).await.unwrap(),
            Identity::Admin("ops".into())
        );
    }

    #[tokio::test]
    async fn node_via_node_domain() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let seen = dial(&material(tmp.path(), "n2"), ALPN_RAFT, addr, NODE_DOMAIN).await;
        assert_eq!(seen.unwrap(), Identity::Node("n1".into()));
        assert_eq!(
            server_result(task).await.unwrap(),
            Identity::Node("n2".into())
        );
    }

    #[tokio::test]
    async fn client_from_other_ca_is_refused_by_server() {
        let tmp = cluster();
        let other = TempDir::new().unwrap();
        init_ca(other.path()).unwrap();
        issue(other.path(), "n2", false).unwrap();
        // Trusts our CA (so it accepts the server) but presents a cert from the other CA.
        let mut rogue = material(other.path(), "n2");
        rogue.roots = material(tmp.path(), "n2").roots;

        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let res = dial(&rogue, ALPN_RAFT, addr, "n1.node.spaced").await;
        assert!(res.is_err(), "{res:?}");
        let err = server_result(task).await.unwrap_err();
        eprintln!("client: {res:?}; server: {err}");
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    }

    #[tokio::test]
    async fn server_with_admin_cert_is_refused() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "admin-ops"));
        let res = dial(&material(tmp.path(), "n2"), ALPN_RAFT, addr, NODE_DOMAIN).await;
        assert!(res.is_err(), "{res:?}");
        let server = server_result(task).await;
        eprintln!("client: {res:?}; server: {server:?}");
        assert!(server.is_err());
    }

    #[test]
    fn the_raft_protocol_version_is_the_data_format() {
        let alpn = format!("spaced-raft/{}", crate::store::DATA_FORMAT);
        assert_eq!(ALPN_RAFT, alpn.as_bytes());
    }

    /// A node of the previous data format (it offers only its own protocol) is accepted and
    /// speaks that one; a node of this build, offering both, speaks this build's.
    #[tokio::test]
    async fn the_previous_formats_protocol_is_spoken_to_a_node_that_offers_only_it() {
        let tmp = cluster();
        let (server_ep, addr) = server_endpoint(&material(tmp.path(), "n1"));
        let _serving = tokio::spawn(async move {
            while let Some(incoming) = server_ep.accept().await {
                if let Ok(conn) = incoming.await {
                    tokio::spawn(async move { conn.closed().await });
                }
            }
        });
        let n2 = material(tmp.path(), "n2");
        let (_old, dialed) = handshake(&n2, ALPN_RAFT_PREVIOUS, addr, "n1.node.spaced").await;
        let conn = dialed
            .expect("the handshake ends")
            .expect("the old node is accepted");
        assert_eq!(
            crate::network::negotiated(&conn).as_deref(),
            Some(ALPN_RAFT_PREVIOUS)
        );
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = ep
            .connect_with(
                n2.client_config_for(ALPNS_RAFT, transport()).unwrap(),
                addr,
                "n1.node.spaced",
            )
            .unwrap()
            .await
            .expect("a node of this build is accepted");
        assert_eq!(
            crate::network::negotiated(&conn).as_deref(),
            Some(ALPN_RAFT)
        );
    }

    /// A build of another protocol version (here: an old one) fails the handshake on
    /// both ends, and both ends can tell that from other handshake failures.
    #[tokio::test]
    async fn another_protocol_version_is_refused_and_named() {
        let tmp = cluster();
        let (server_ep, addr) = server_endpoint(&material(tmp.path(), "n1"));
        let (first_tx, first) = tokio::sync::oneshot::channel();
        let _serving = tokio::spawn(async move {
            let incoming = server_ep.accept().await.expect("an incoming connection");
            let _ = first_tx.send(incoming.await.map(|_| ()));
            // Serve the second handshake too, so that the client, not a silence, ends it.
            if let Some(incoming) = server_ep.accept().await {
                let _ = incoming.await;
            }
        });
        let n2 = material(tmp.path(), "n2");
        let (_client, dialed) = handshake(&n2, b"spaced-raft/2", addr, "n1.node.spaced").await;
        let err = dialed
            .expect("the handshake ends")
            .expect_err("an old protocol version was accepted");
        assert!(is_protocol_mismatch(&err), "{err:?}");
        let said = explain_connection_error(&err, ALPN_RAFT);
        assert!(said.contains("does not speak spaced-raft/7"), "{said}");
        assert!(said.contains("another spaced build"), "{said}");
        let server_err = first.await.unwrap().expect_err("the server accepted it");
        assert!(is_protocol_mismatch(&server_err), "{server_err:?}");

        // A refused certificate is a handshake failure of another kind.
        let (_client, wrong_name) = handshake(&n2, ALPN_RAFT, addr, "n3.node.spaced").await;
        let wrong_name = wrong_name
            .expect("the handshake ends")
            .expect_err("a wrong server name was accepted");
        assert!(!is_protocol_mismatch(&wrong_name), "{wrong_name:?}");
        assert_eq!(
            explain_connection_error(&wrong_name, ALPN_RAFT),
            wrong_name.to_string()
        );
    }

    #[tokio::test]
    async fn unknown_alpn_fails() {
        let tmp = cluster();
        let (_ep, addr, task) = serve(&material(tmp.path(), "n1"));
        let res = dial(
            &material(tmp.path(), "n2"),
            b"other/1",
            addr,
            "n1.node.spaced",
        )
        .await;
        assert!(res.is_err(), "{res:?}");
        let server = server_result(task).await;
        eprintln!("client: {res:?}; server: {server:?}");
        assert!(server.is_err());
    }
}
