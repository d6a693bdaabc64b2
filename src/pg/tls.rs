//! The rustls client configuration for a resolved [`TlsOptions`], and what a failed handshake
//! means in words.
//!
//! - `verify-full`: the chain is verified against the roots and the certificate must name the
//!   host (webpki's verifier, unchanged).
//! - `verify-ca`: the same verifier; only its host-name verdict is set aside (webpki checks the
//!   name last, after the chain, so a name error means the chain was good).
//! - `require` / `prefer` / `allow`: encrypted, certificate not verified (libpq's meaning);
//!   handshake signatures are still checked, so the peer holds the key of what it presented.
//!
//! Channel binding: tokio-postgres-rustls hands tokio-postgres the `tls-server-end-point` hash
//! of the server certificate, so SCRAM-SHA-256-PLUS is used when the server offers it
//! (`channel_binding=prefer`, tokio-postgres's default; `channel_binding=require` enforces it).
//! Always aws-lc-rs, the provider the rest of the tree (pg_walstream, object_store) uses.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::dsn::{Roots, SslMode, TlsOptions};

/// The client configuration for `tls`; `None` for `sslmode=disable`. Errors name the file and
/// what is wrong with it.
pub(crate) fn client_config(tls: &TlsOptions) -> Result<Option<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match tls.mode {
        SslMode::Disable => return Ok(None),
        SslMode::Allow | SslMode::Prefer | SslMode::Require => {
            Arc::new(Unverified(provider.clone()))
        }
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = root_store(tls.roots.as_ref())?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            if tls.mode == SslMode::VerifyCa {
                Arc::new(AnyHostName(webpki))
            } else {
                webpki
            }
        }
    };
    Ok(Some(
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

fn root_store(roots: Option<&Roots>) -> Result<RootCertStore, String> {
    match roots {
        Some(Roots::System) => Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
        Some(Roots::File(path)) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {shown}: cannot read it: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslrootcert {shown}: not a PEM certificate file: {e}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert {shown}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)"
                ));
            }
            let mut store = RootCertStore::empty();
            for cert in certs {
                store.add(cert).map_err(|e| {
                    format!("sslrootcert {shown}: a certificate in it is unusable: {e}")
                })?;
            }
            Ok(store)
        }
        // dsn::resolve sets roots for every verifying mode.
        None => Err("no CA certificates to verify the server with (set sslrootcert)".into()),
    }
}

/// The rustls error behind a failed handshake of `e`, if that is what failed.
pub(crate) fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // tokio-rustls wraps it in an io::Error, whose `source` skips the wrapped error.
        if let Some(r) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// What a rejected server certificate means for the user, when rustls says which it is.
pub(crate) fn certificate_problem(e: &rustls::Error) -> Option<&'static str> {
    let rustls::Error::InvalidCertificate(c) = e else {
        return None;
    };
    Some(match c {
        CertificateError::UnknownIssuer => {
            "the server's certificate is not signed by a CA in sslrootcert"
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the server's certificate does not name this host (sslmode=verify-full checks it)"
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the server's certificate has expired"
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the server's certificate is not valid yet (check the clock)"
        }
        CertificateError::Revoked => "the server's certificate is revoked",
        // webpki picks the issuer by name: a CA in sslrootcert with the issuer's name but
        // another key (a different CA of the same name) shows as a bad signature.
        CertificateError::BadSignature => {
            "the server's certificate is not signed by a CA in sslrootcert (one there has its \
             issuer's name, but another key)"
        }
        CertificateError::BadEncoding => "the server's certificate is malformed",
        _ => "the server's certificate was rejected",
    })
}

/// `sslmode=require` and weaker: any certificate, but a handshake signed by its key.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: webpki's verdict, except that the certificate need not name the host.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_named_with_its_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for (path, want) in [
            (&missing, "cannot read it"),
            (&empty, "no certificate in it"),
        ] {
            let tls = TlsOptions {
                mode: SslMode::VerifyFull,
                roots: Some(Roots::File(path.clone())),
            };
            let e = client_config(&tls).unwrap_err();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(want),
                "{e}"
            );
        }
    }

    #[test]
    fn disable_needs_no_tls_and_system_roots_load() {
        let off = TlsOptions {
            mode: SslMode::Disable,
            roots: None,
        };
        assert!(client_config(&off).unwrap().is_none());
        let system = TlsOptions {
            mode: SslMode::VerifyFull,
            roots: Some(Roots::System),
        };
        assert!(client_config(&system).unwrap().is_some());
    }
}
