//! Models without a batcher, shared fairly between tenants.
//!
//! An unbatched model runs at most `instances` calls at once (one per ONNX Runtime session or
//! worker slot); beyond that callers wait. The backends' own pools are first come first
//! served, so a tenant with 256 requests in flight would put another tenant's one request
//! behind all of them. [`FairShared`] puts a [`FairGate`] of the model's instance count in
//! front: each freed turn goes to the tenant holding fewest, then to the one served longest
//! ago, so a backlog delays another tenant by about one call per instance. The wait counts as
//! the request's queue time. (Batched models get the same from [`crate::batcher`].)

use std::sync::Arc;
use std::time::Instant;

use weft_core::fair::{FairGate, FairPermit};
use weft_core::{BoxFuture, Model, ModelMetadata, NamedTensor, RequestContext, Result, Spent};

/// A model whose instance turns are shared fairly between the tenants calling it.
pub struct FairShared {
    inner: Arc<dyn Model>,
    turns: FairGate,
}

impl FairShared {
    /// Shares `instances` concurrent calls of `inner` (at least one).
    pub fn new(inner: Arc<dyn Model>, instances: usize) -> Self {
        let instances = instances.max(1);
        FairShared {
            inner,
            turns: FairGate::new(instances, instances),
        }
    }
}

impl Model for FairShared {
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.inner.health()
    }

    fn serving(&self) -> weft_core::ServingConfig {
        self.inner.serving()
    }

    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let turn = take_turn(&self.turns, request).await;
            let result = self.inner.infer(request, inputs).await;
            drop(turn);
            result
        })
    }
}

/// A turn of `turns` for the request's tenant; time spent waiting for it counts as the request's
/// queue time (a turn free at once adds none).
pub(crate) async fn take_turn(turns: &FairGate, request: &RequestContext) -> FairPermit {
    if let Some(turn) = turns.try_acquire(request.share_key()) {
        return turn;
    }
    let waited = Instant::now();
    let turn = turns.acquire(request.share_key()).await;
    request.add(Spent::Queue, waited.elapsed());
    turn
}
