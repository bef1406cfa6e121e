//! Prometheus metrics. The recorder is process-global, so it is installed once
//! and shared by every server in the process.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the recorder if nobody has yet.
pub fn install() {
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().ok());
}

/// Drain recorded histogram samples into their summaries every few seconds until shutdown.
///
/// The recorder keeps every histogram sample until upkeep folds it into the summary; without
/// this loop a server nobody scrapes grew by ~115 bytes per run (the soak's whole slope).
pub async fn run_upkeep(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
        if let Some(Some(h)) = HANDLE.get() {
            h.run_upkeep();
        }
    }
}

/// Prometheus text exposition of all metrics.
pub fn render() -> String {
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}
