//! The control plane's own certificate authority: the API server's serving certificate, client
//! certificates for the admin and for ordinary users, and the service-account signing key.
//!
//! Client certificates are how the tests get identities RBAC governs: the common name is the
//! user, the organization a group (`system:masters` bypasses RBAC, so only the admin has it).

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A throwaway certificate authority for one control plane.
#[derive(Debug)]
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA with a fresh P-256 key.
    pub fn new() -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = name("tether-e2e-ca", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generating a P-256 key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signing the CA");
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for `localhost` and 127.0.0.1, and for `extra_ips`.
    pub fn serving(&self, extra_ips: &[IpAddr]) -> CertPair {
        self.serving_for(&["localhost", "kubernetes"], extra_ips)
    }

    /// A serving certificate for the DNS names `names`, 127.0.0.1 and `extra_ips`.
    pub fn serving_for(&self, names: &[&str], extra_ips: &[IpAddr]) -> CertPair {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid DNS names");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        for ip in extra_ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.distinguished_name = name("kube-apiserver", None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for `user`, in `group` when given.
    pub fn client(&self, user: &str, group: Option<&str>) -> CertPair {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> CertPair {
        let key = KeyPair::generate().expect("generating a P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a certificate");
        CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Default for Authority {
    fn default() -> Self {
        Self::new()
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

/// A fresh ECDSA P-256 key pair for signing service-account tokens: (private PKCS#8 PEM,
/// public SPKI PEM).
pub fn service_account_key() -> (String, String) {
    let key = KeyPair::generate().expect("generating a P-256 key");
    (key.serialize_pem(), key.public_key_pem())
}
