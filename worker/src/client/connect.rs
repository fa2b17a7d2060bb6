//! The channel to the coordinator, with the shared token on every call.

use super::options::ClientOptions;
use msae_shared::proto::coordinator_client::CoordinatorClient;
use std::time::Duration;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds `authorization: Bearer TOKEN` to every call when a token is set.
#[derive(Clone)]
pub(super) struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(msae_shared::auth::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

pub(super) type Client = CoordinatorClient<InterceptedService<Channel, BearerAuth>>;

/// A client of `opts.coordinator`; Err for a bad URL or a token that cannot be a header.
pub(super) fn connect(opts: &ClientOptions) -> anyhow::Result<Client> {
    let endpoint = opts
        .tls
        .endpoint(&opts.coordinator)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    // Lazy: connects on the first call and reconnects after the coordinator comes back.
    let channel = endpoint.connect_lazy();
    let auth = opts.token.as_deref().map(msae_shared::auth::bearer).transpose()?;
    Ok(CoordinatorClient::with_interceptor(channel, BearerAuth(auth)))
}
