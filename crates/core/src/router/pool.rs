//! Connections to agents: one lazily connected channel per endpoint, dropped once no live
//! instance uses it. `https://` endpoints are reached over TLS: with the pool's client TLS
//! configuration if it has one, else with the system's roots.

use std::{collections::HashMap, time::Duration};

use parking_lot::Mutex;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::MeshError;

/// Connections to agents, one lazily connected channel per endpoint.
#[derive(Debug, Default)]
pub(super) struct ChannelPool {
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<ClientTlsConfig>,
}

impl ChannelPool {
    pub(super) fn with_tls(tls: ClientTlsConfig) -> Self {
        Self {
            channels: Mutex::default(),
            tls: Some(tls),
        }
    }

    pub(super) fn get(
        &self,
        endpoint: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, MeshError> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let bad = |e: tonic::transport::Error| {
            MeshError::Unavailable(format!("bad agent endpoint {endpoint}: {e}"))
        };
        let mut builder = Endpoint::from_shared(endpoint.to_owned()).map_err(bad)?;
        if let Some(tls) = &self.tls
            && endpoint.starts_with("https://")
        {
            builder = builder.tls_config(tls.clone()).map_err(bad)?;
        }
        // One channel per endpoint, kept: its TLS session and HTTP/2 connection are reused.
        let channel = builder
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Drops the connections to endpoints no live instance uses any more.
    pub(super) fn prune(&self, live: &std::collections::HashSet<String>) {
        self.channels
            .lock()
            .retain(|endpoint, _| live.contains(endpoint));
    }

    pub(super) fn len(&self) -> usize {
        self.channels.lock().len()
    }
}
