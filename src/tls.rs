//! rustls configurations from PEM files: the HTTP API's server side and the
//! Redis client's trusted roots, on the ring provider.
//!
//! Two crypto providers are compiled in (other dependencies enable
//! aws-lc-rs), so rustls cannot pick a process default by itself and a
//! client library that asks for one (fred parsing a `rediss://` URL) would
//! panic: the Redis and MongoDB clients call [`ensure_provider`] before they
//! parse their URL.

use anyhow::Context;
use rustls::{ClientConfig, RootCertStore, ServerConfig, crypto::ring};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use std::sync::Arc;

/// Installs ring as the process's default provider unless one is set.
pub fn ensure_provider() {
    let _ = ring::default_provider().install_default();
}

fn certificates(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {path}"))?;
    anyhow::ensure!(!certs.is_empty(), "{path}: no PEM certificate in it");
    Ok(certs)
}

/// A server configuration from a certificate chain and its private key.
pub fn server_config(cert: &str, key: &str) -> anyhow::Result<ServerConfig> {
    let chain = certificates(cert).context("http.tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("http.tls_key: reading a private key from {key}"))?;
    ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("http.tls_cert and http.tls_key do not make a usable pair")
}

/// A client configuration trusting the CA certificates in `ca` (PEM), or
/// the system's roots when `ca` is empty.
pub fn client_config(ca: &str) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    if ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    } else {
        for cert in certificates(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("{ca}: not a usable CA"))?;
        }
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}
