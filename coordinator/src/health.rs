//! `msae-coordinator health`: asks a coordinator's standard `grpc.health.v1` service whether it
//! is serving, and says so through the exit status.
//!
//! For probes that cannot speak TLS themselves (Kubernetes' `grpc:` probes do not): an `exec`
//! probe runs this command, which connects with the same client TLS flags as `status` and
//! `report`. The health service answers without a token, so none is asked for.

use crate::cli::TlsArgs;
use msae_shared::proto::coordinator_server::SERVICE_NAME as COORDINATOR_SERVICE;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Options of `msae-coordinator health`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The coordinator to ask (`HOST:PORT` means http://HOST:PORT). With TLS, name it as its
    /// certificate does (e.g. https://localhost:50051 inside its own pod).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// The service to ask about; "" asks about the server as a whole.
    #[arg(long, value_name = "NAME", default_value = COORDINATOR_SERVICE)]
    pub service: String,
    /// Give up (and fail) after this long: connecting and the answer together.
    #[arg(long, value_name = "DURATION", default_value = "5s",
          value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Ok with a line to print when the coordinator at `args.coordinator` says SERVING for
/// `args.service`; otherwise an error saying what it said, or why it could not be asked.
pub async fn check(args: &HealthArgs) -> anyhow::Result<String> {
    let url = crate::run::url_of(&args.coordinator);
    let shown = if args.service.is_empty() { "the server" } else { args.service.as_str() };
    let ask = async {
        let channel = args
            .tls
            .client()
            .endpoint(&url)
            .map_err(anyhow::Error::msg)?
            .connect_timeout(args.timeout)
            .timeout(args.timeout)
            .connect()
            .await
            .map_err(|e| {
                anyhow::Error::new(e).context(format!("cannot reach the coordinator at {url}"))
            })?;
        let request = HealthCheckRequest { service: args.service.clone() };
        let reply = HealthClient::new(channel).check(request).await.map_err(|status| {
            if status.code() == tonic::Code::NotFound {
                anyhow::anyhow!("the coordinator at {url} does not know the service {shown:?}")
            } else {
                anyhow::anyhow!(
                    "the coordinator at {url} did not answer the health check: {:?}: {}",
                    status.code(),
                    status.message()
                )
            }
        })?;
        Ok::<_, anyhow::Error>(reply.into_inner().status())
    };
    let status = tokio::time::timeout(args.timeout, ask).await.map_err(|_| {
        anyhow::anyhow!(
            "no answer from the coordinator at {url} within {:?} (--timeout)",
            args.timeout
        )
    })??;
    match status {
        ServingStatus::Serving => Ok(format!("{url}: {shown} is SERVING")),
        other => anyhow::bail!(
            "the coordinator at {url} reports {shown} as {} (not SERVING)",
            other.as_str_name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_ask_the_local_coordinator_service() {
        let cli = crate::cli::Cli::try_parse_from(["msae-coordinator", "health"]).unwrap();
        let Some(crate::cli::Command::Health(args)) = cli.command else { panic!("not health") };
        assert_eq!(args.coordinator, "http://127.0.0.1:50051");
        assert_eq!(args.service, "msae.v1.Coordinator");
        assert_eq!(args.timeout, Duration::from_secs(5));
        let e = crate::cli::Cli::try_parse_from(["m", "health", "--timeout", "0s"]).unwrap_err();
        assert!(e.to_string().contains("--timeout"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let args = HealthArgs {
            coordinator: format!("127.0.0.1:{port}"),
            service: String::new(),
            timeout: Duration::from_secs(5),
            tls: Default::default(),
        };
        let e = format!("{:#}", check(&args).await.unwrap_err());
        assert!(e.starts_with(&format!("cannot reach the coordinator at http://127.0.0.1:{port}")));
    }
}
