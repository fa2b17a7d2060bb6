//! TLS for the protocol: the coordinator's certificate (and optionally the client CA it asks
//! workers for), and what clients trust. Files are PEM; every error names the file.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// The server side: `--tls-cert`, `--tls-key`, and `--tls-client-ca` to require client
/// certificates signed by that CA.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The tonic configuration, checked now (a bad key or certificate fails here, naming the
    /// files, not at the first handshake).
    pub fn config(&self) -> Result<ServerTlsConfig, String> {
        let identity =
            Identity::from_pem(read("TLS certificate", &self.cert)?, read("TLS key", &self.key)?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read("client CA", ca)?));
        }
        tonic::transport::Server::builder().tls_config(config.clone()).map_err(|e| {
            format!(
                "the TLS certificate {} and key {} cannot be used: {e}",
                self.cert.display(),
                self.key.display()
            )
        })?;
        Ok(config)
    }
}

/// The client side: `--tls-ca` (the CA that signed the coordinator's certificate) and, for a
/// coordinator that asks for one, a client certificate and key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// An endpoint for `url`: `https://` gets TLS trusting `ca` (required), `http://` none.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("invalid coordinator URL {url:?}: {e}"))?;
        if !url.starts_with("https://") {
            if self.ca.is_some() || self.cert.is_some() {
                return Err(format!(
                    "TLS files are given but {url} is not an https:// URL; use https://"
                ));
            }
            return Ok(endpoint);
        }
        let Some(ca) = &self.ca else {
            return Err(format!(
                "{url} is https://: pass --tls-ca FILE (or MSAE_TLS_CA), the CA certificate that \
                 signed the coordinator's"
            ));
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                config = config.identity(Identity::from_pem(
                    read("client certificate", c)?,
                    read("client key", k)?,
                ));
            }
            (None, None) => {}
            _ => return Err("--tls-cert and --tls-key go together".into()),
        }
        endpoint.tls_config(config).map_err(|e| format!("TLS for {url}: {e}"))
    }
}

/// The client-side TLS flags, shared by the worker and the coordinator's client commands
/// (`report`, `status`, `export`, `list`, `health`).
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// For an https:// coordinator: the CA certificate (PEM) that signed its certificate.
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a coordinator that requires one (with --tls-key).
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[cfg(feature = "clap")]
impl TlsArgs {
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}
