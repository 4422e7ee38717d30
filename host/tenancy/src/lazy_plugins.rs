//! Tenants' plugins compiled on first use and dropped under the plugin cache budget.
//!
//! A compiled component costs its image (machine code and metadata, hundreds of KiB to tens of
//! MiB) for as long as it is loaded, and compiling every stored version at start-up makes
//! start-up grow with the store. A [`LazyPlugin`] is registered with the role its push found
//! (what graph validation needs) and compiles, or deserializes from the compile cache, on its
//! first call; the shared `weft_engine::lazy` cell gives it single flight, least-recently-used
//! eviction under `--plugin-cache-budget`, and never drops a plugin while a call runs it.

use std::any::Any;
use std::sync::Arc;

use weft_core::{BoxFuture, Error, Result};
use weft_engine::graph::{PluginCall, PluginReply, PluginRole};
use weft_engine::lazy::{CellSpec, Lazy, Loader, Residency};

use crate::backends::{SandboxCall, SandboxPlugin};

/// A stored plugin version that compiles on its first call.
pub struct LazyPlugin {
    name: String,
    role: PluginRole,
    cell: Arc<Lazy<Arc<dyn SandboxPlugin>>>,
}

impl LazyPlugin {
    /// Registers `name` with the `role` and `cost` (compiled bytes) its push recorded;
    /// `compile` reads and compiles it. A compile that finds another role is refused (the
    /// graphs validated against the recorded one would call the wrong export).
    pub fn new(
        name: &str,
        role: PluginRole,
        cost: u64,
        compile: Loader<Arc<dyn SandboxPlugin>>,
        residency: Arc<Residency>,
    ) -> Arc<LazyPlugin> {
        let label = format!("plugin '{name}'");
        let loader: Loader<Arc<dyn SandboxPlugin>> = {
            let label = label.clone();
            Arc::new(move || {
                let plugin = compile()?;
                if plugin.role() == role {
                    Ok(plugin)
                } else {
                    Err(Error::unavailable(format!(
                        "{label} compiled as a {} but was pushed as a {}; push it again",
                        plugin.role().as_str(),
                        role.as_str()
                    )))
                }
            })
        };
        let cell = Lazy::new(
            CellSpec {
                label,
                cost,
                pinned: false,
                group: None,
                loader,
            },
            residency,
        );
        Arc::new(LazyPlugin {
            name: name.to_string(),
            role,
            cell,
        })
    }

    /// Takes a plugin already compiled (a push compiles it to check it) as loaded, if the
    /// budget has room; otherwise it compiles on its first call.
    pub fn adopt(&self, plugin: Arc<dyn SandboxPlugin>) {
        if plugin.role() == self.role {
            self.cell.adopt(plugin);
        }
    }

    /// The compiled plugin, when it is loaded now (for scrape-time metrics).
    pub fn resident(&self) -> Option<Arc<dyn SandboxPlugin>> {
        self.cell.resident()
    }

    /// Drops the compiled plugin unless a call is running it.
    pub fn unload(&self) -> Result<()> {
        self.cell.unload()
    }
}

impl SandboxPlugin for LazyPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn role(&self) -> PluginRole {
        self.role
    }

    fn call<'a>(
        &'a self,
        call: SandboxCall,
        plugin_call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        Box::pin(async move {
            let (_in_use, plugin) = self.cell.enter(&call.request).await?;
            plugin.call(call, plugin_call).await
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn compiled_bytes(&self) -> u64 {
        self.cell.cost()
    }
}
