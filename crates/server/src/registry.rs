//! Apps and functions from sync, held in memory as an immutable snapshot that
//! is swapped whole on every sync (readers never block on a sync).

use crate::store::{FunctionRecord, Store, StoreResult};
use cairn_protocol::{FunctionConfig, Trigger};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A registered function, pre-digested for matching and execution.
#[derive(Debug)]
pub struct FunctionEntry {
    /// Composite id (slug).
    pub slug: String,
    /// Owning app.
    pub app: String,
    /// The synced config.
    pub config: FunctionConfig,
    /// `(event name, optional CEL expression)` triggers.
    pub event_triggers: Vec<(String, Option<String>)>,
    /// Cron schedules.
    pub crons: Vec<String>,
}

impl FunctionEntry {
    /// Build from a stored record; `None` if the config no longer parses.
    pub fn from_record(rec: &FunctionRecord) -> Option<Self> {
        let config: FunctionConfig = serde_json::from_value(rec.config.clone()).ok()?;
        let mut event_triggers = Vec::new();
        let mut crons = Vec::new();
        for t in &config.triggers {
            match t {
                Trigger::Event { event, expression } => event_triggers.push((
                    event.clone(),
                    expression.clone().filter(|e| !e.trim().is_empty()),
                )),
                Trigger::Cron { cron, .. } => crons.push(cron.clone()),
            }
        }
        Some(FunctionEntry {
            slug: rec.slug.clone(),
            app: rec.app.clone(),
            config,
            event_triggers,
            crons,
        })
    }

    /// Total attempts per queue item (retries + 1).
    pub fn max_attempts(&self) -> u32 {
        self.config.retries() + 1
    }
}

/// Keep the function table in step with syncs received by other processes sharing the
/// store (several `cairn` nodes on one PostgreSQL database): they are picked up within one
/// poll interval.
pub async fn run_refresh(engine: Arc<crate::Engine>) {
    let mut shutdown = engine.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(engine.config.poll_interval) => {}
            _ = shutdown.changed() => return,
        }
        match engine.registry.refresh(engine.store.as_ref()).await {
            Ok(true) => {
                tracing::info!("functions reloaded after a sync elsewhere");
                engine.cron_wake.notify_one();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "checking for syncs"),
        }
    }
}

/// The in-memory function table.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Arc<BTreeMap<String, Arc<FunctionEntry>>>>,
    /// What the apps looked like at the last load, to notice syncs made by other processes.
    seen: parking_lot::Mutex<Vec<(String, String, i64)>>,
}

impl Registry {
    /// Reload if any app was synced since the last load, by this process or another one
    /// sharing the store. Returns whether it reloaded.
    pub async fn refresh(&self, store: &dyn Store) -> StoreResult<bool> {
        let apps: Vec<(String, String, i64)> = store
            .apps()
            .await?
            .into_iter()
            .map(|a| (a.name, a.checksum, a.synced_at))
            .collect();
        if *self.seen.lock() == apps {
            return Ok(false);
        }
        self.reload(store).await?;
        *self.seen.lock() = apps;
        Ok(true)
    }

    /// Reload everything from the store.
    pub async fn reload(&self, store: &dyn Store) -> StoreResult<()> {
        let map: BTreeMap<String, Arc<FunctionEntry>> = store
            .functions()
            .await?
            .iter()
            .filter_map(FunctionEntry::from_record)
            .map(|f| (f.slug.clone(), Arc::new(f)))
            .collect();
        *self.inner.write() = Arc::new(map);
        Ok(())
    }

    /// A function by slug.
    pub fn get(&self, slug: &str) -> Option<Arc<FunctionEntry>> {
        self.inner.read().get(slug).cloned()
    }

    /// All functions.
    pub fn all(&self) -> Vec<Arc<FunctionEntry>> {
        self.inner.read().values().cloned().collect()
    }
}
