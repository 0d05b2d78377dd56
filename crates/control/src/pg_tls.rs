//! TLS for every PostgreSQL connection keygate makes (the key store, its
//! LISTEN connection, the request-log database), with libpq's `sslmode`
//! values over rustls:
//!
//! | sslmode           | encryption                    | server certificate checked      |
//! |-------------------|-------------------------------|---------------------------------|
//! | `disable`         | never                         | -                               |
//! | `prefer` (default)| if the server offers it       | no                              |
//! | `require`         | always                        | no (chain only with sslrootcert)|
//! | `verify-ca`       | always                        | chain to `sslrootcert`          |
//! | `verify-full`     | always                        | chain and host name             |
//!
//! `sslrootcert=<PEM file>` names the CA; `verify-ca`/`verify-full` need it.
//! Both are taken out of the URL here because the driver itself only knows
//! `disable`, `prefer` and `require`.

use percent_encoding::percent_decode_str;
use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
pub use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "disable" => Mode::Disable,
            "prefer" | "allow" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            _ => {
                return Err(format!(
                    "sslmode '{s}' is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

/// A PostgreSQL URL split into the driver's config and the TLS to use.
pub struct Target {
    pub config: postgres::Config,
    pub mode: Mode,
    pub tls: MakeRustlsConnect,
}

/// Parses `postgres://…?sslmode=…&sslrootcert=…`; errors name the
/// parameter at fault and never contain the URL (it may hold a password).
pub fn parse(url: &str) -> Result<Target, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = Mode::Prefer;
    let mut root_cert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode_str(v)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("{k}: not valid UTF-8"))
        };
        match k {
            "sslmode" => mode = value()?.parse()?,
            "sslrootcert" => root_cert = Some(PathBuf::from(value()?)),
            _ => rest.push(pair),
        }
    }
    let driver_url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config = postgres::Config::from_str(&driver_url).map_err(|e| {
        format!("not a PostgreSQL URL ({e}); expected postgres://user@host:port/db")
    })?;
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    let tls = connector(mode, root_cert)?;
    Ok(Target { config, mode, tls })
}

fn connector(mode: Mode, root_cert: Option<PathBuf>) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &root_cert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {}: no CA certificate in it",
                    path.display()
                ));
            }
            Some(Arc::new(roots))
        }
        None if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) => {
            return Err("sslmode=verify-ca and verify-full need sslrootcert=<CA file (PEM)>".into())
        }
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        Some(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                // libpq: require with a root certificate behaves as verify-ca.
                Arc::new(ChainOnly(webpki))
            }
        }
        None => Arc::new(Unverified(provider.clone())),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `verify-ca`: the chain must lead to the CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first: a name error means the chain passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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

/// `prefer`/`require` without a CA, as libpq: encrypted against passive
/// listeners, the certificate itself not checked (the handshake signature is).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let t =
            parse("postgres://u:pw@127.0.0.1:5433/db?sslmode=require&application_name=kg").unwrap();
        assert_eq!(t.mode, Mode::Require);
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(t.config.get_application_name(), Some("kg"));
        assert_eq!(parse("postgres://u@h/db").unwrap().mode, Mode::Prefer);
        assert_eq!(
            parse("postgres://u@h/db?sslmode=disable")
                .unwrap()
                .config
                .get_ssl_mode(),
            SslMode::Disable
        );
    }

    #[test]
    fn verification_without_a_ca_or_a_bad_mode_is_refused_without_the_password() {
        for url in [
            "postgres://u:secretpw@h/db?sslmode=verify-full",
            "postgres://u:secretpw@h/db?sslmode=verify-ca",
            "postgres://u:secretpw@h/db?sslmode=strict",
            "postgres://u:secretpw@h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem",
        ] {
            let err = parse(url).err().unwrap();
            assert!(err.contains("ssl"), "{err}");
            assert!(!err.contains("secretpw"), "{err}");
        }
    }
}
