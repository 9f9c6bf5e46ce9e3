//! Runs the backend conformance suite against the real embedded backend on a temp directory.

use agentmesh_queue::conformance::BackendFactory;
use agentmesh_queue::{BackendConfig, EmbeddedBackend, QueueBackend, QueueError};
use std::sync::Arc;

/// Fresh temp directory per test; every `open` reopens the same directory.
struct TempEmbedded {
    dir: tempfile::TempDir,
}

impl TempEmbedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

#[async_trait::async_trait]
impl BackendFactory for TempEmbedded {
    async fn open(&self, config: BackendConfig) -> Result<Arc<dyn QueueBackend>, QueueError> {
        let dir = self.dir.path().to_owned();
        let backend = tokio::task::spawn_blocking(move || EmbeddedBackend::open(&dir, config))
            .await
            .map_err(|e| QueueError::Storage(e.to_string()))??;
        Ok(Arc::new(backend))
    }
}

agentmesh_queue::conformance_suite!(TempEmbedded::new());
