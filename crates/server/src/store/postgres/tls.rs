//! TLS for PostgreSQL connections, chosen by the URL's `sslmode` with libpq's names.
//!
//! | `sslmode` | connection |
//! |---|---|
//! | absent, `disable`, `allow`, `prefer` | plain |
//! | any, to a Unix socket | plain (the server offers no TLS there; libpq ignores `sslmode` too) |
//! | `require` | encrypted; the certificate is not checked (as libpq), unless `sslrootcert` names roots, which makes it `verify-ca` (as libpq) |
//! | `verify-ca` | encrypted; the certificate must chain to `sslrootcert`'s roots, or to the bundled Mozilla roots without it |
//! | `verify-full` | as `verify-ca`, and the certificate must name the host the URL connects to |
//!
//! libpq's `allow` and `prefer` try TLS when the server offers it. Here they stay plain, as
//! `disable`: encryption is something the URL asks for, so that no URL silently costs a TLS
//! handshake on every pooled connection, or silently does without one.
//!
//! `tokio-postgres` knows only `disable`, `prefer` and `require`, so the URL's `sslmode` and
//! `sslrootcert` are taken out of its query here and the rest is handed on as it was.

use super::{StoreError, StoreResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What the URL asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    /// Encrypted, certificate not checked.
    Require,
    VerifyCa,
    VerifyFull,
}

/// Parses `url` and builds the connector its `sslmode` and `sslrootcert` ask for; the
/// returned config's `ssl_mode` says whether that connector is used.
///
/// A URL in `key=value` form (no `://`) is parsed whole by `tokio-postgres`, which knows
/// `sslmode=require` there; it is handled as above.
pub(super) fn configure(url: &str) -> StoreResult<(tokio_postgres::Config, MakeRustlsConnect)> {
    let bad = |m: String| StoreError::Unusable(m);
    let (rest, mode, root) = take_ssl_params(url)?;
    let mut cfg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| bad(format!("invalid PostgreSQL URL: {}", super::pg_message(&e))))?;
    let mode = match mode.as_deref() {
        None if cfg.get_ssl_mode() == SslMode::Require => Mode::Require,
        None | Some("disable" | "allow" | "prefer") => Mode::Plain,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => {
            return Err(bad(format!(
                "invalid sslmode {other:?} in the PostgreSQL URL: expected disable, allow, \
                 prefer, require, verify-ca or verify-full"
            )))
        }
    };
    let mode = match (mode, &root) {
        (Mode::Plain, Some(_)) => {
            return Err(bad(
                "sslrootcert is set but the PostgreSQL URL does not ask for TLS: add \
                 sslmode=verify-full (or verify-ca) to check the server against it"
                    .into(),
            ))
        }
        // libpq: with roots given, `require` checks the certificate against them.
        (Mode::Require, Some(_)) => Mode::VerifyCa,
        (m, _) => m,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match (&root, mode) {
        (Some(path), _) => read_roots(path)?,
        (None, Mode::VerifyCa | Mode::VerifyFull) => {
            RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
        }
        (None, _) => RootCertStore::empty(),
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS set-up: {e}")))?;
    let config = match mode {
        Mode::Plain | Mode::VerifyFull => builder.with_root_certificates(roots),
        Mode::Require | Mode::VerifyCa => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    roots: (mode == Mode::VerifyCa).then_some(roots),
                    provider,
                }))
        }
    }
    .with_no_client_auth();
    // As libpq: no TLS over Unix sockets (the server offers none there), whatever `sslmode`
    // says, so one URL serves a local socket and a remote host alike.
    let hosts = cfg.get_hosts();
    let on_sockets = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
    cfg.ssl_mode(if mode == Mode::Plain || on_sockets {
        SslMode::Disable
    } else {
        SslMode::Require
    });
    Ok((cfg, MakeRustlsConnect::new(config)))
}

/// `url` without its `sslmode` and `sslrootcert` query parameters, and their decoded values.
fn take_ssl_params(url: &str) -> StoreResult<(String, Option<String>, Option<String>)> {
    let (Some((base, query)), true) = (url.split_once('?'), url.contains("://")) else {
        return Ok((url.to_string(), None, None));
    };
    let (mut mode, mut root, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        let slot = match key.as_ref() {
            "sslmode" => &mut mode,
            "sslrootcert" => &mut root,
            _ => {
                kept.push(pair);
                continue;
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(StoreError::Unusable(format!(
                "{key} is given twice in the PostgreSQL URL"
            )));
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, root))
}

fn read_roots(path: &str) -> StoreResult<RootCertStore> {
    let bad = |m: String| StoreError::Unusable(format!("sslrootcert {path}: {m}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

/// `require` (no roots: any certificate) and `verify-ca` (roots: the chain, not the name).
/// Either way the handshake's signatures are checked against the certificate's key, so the
/// connection is encrypted to whoever holds it.
#[derive(Debug)]
struct Lenient {
    roots: Option<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &ParsedCertificate::try_from(end_entity)?,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_params_come_off_the_url_and_the_rest_stays_as_written() {
        let (rest, mode, root) = take_ssl_params(
            "postgres://u:p%40ss@h:5432/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@h:5432/db?application_name=a%20b&connect_timeout=3"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, _) = take_ssl_params("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode.as_deref()),
            ("postgres://h/db", Some("require"))
        );
        let (rest, mode, _) = take_ssl_params("host=h sslmode=require").unwrap();
        assert_eq!((rest.as_str(), mode), ("host=h sslmode=require", None));
    }

    #[test]
    fn a_wrong_ssl_setting_is_refused_by_name() {
        let msg = |url: &str| match configure(url) {
            Err(StoreError::Unusable(m)) => m,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{url} accepted"),
        };
        assert!(
            msg("postgres://h/db?sslmode=verify-all").contains("invalid sslmode \"verify-all\"")
        );
        assert!(msg("postgres://h/db?sslmode=require&sslmode=disable").contains("twice"));
        assert!(msg("postgres://h/db?sslrootcert=%2Fca.pem").contains("does not ask for TLS"));
        assert!(
            msg("postgres://h/db?sslmode=verify-ca&sslrootcert=%2Fno%2Fsuch.pem")
                .contains("sslrootcert /no/such.pem")
        );
    }

    #[test]
    fn each_mode_picks_plain_or_tls() {
        for (url, want) in [
            ("postgres://h/db", SslMode::Disable),
            ("postgres://h/db?sslmode=prefer", SslMode::Disable),
            ("postgres://h/db?sslmode=require", SslMode::Require),
            ("postgres://h/db?sslmode=verify-full", SslMode::Require),
            ("host=h sslmode=require", SslMode::Require),
            (
                "postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=verify-full",
                SslMode::Disable,
            ),
            ("host=/tmp,h sslmode=require", SslMode::Require),
        ] {
            assert_eq!(configure(url).unwrap().0.get_ssl_mode(), want, "{url}");
        }
    }
}
