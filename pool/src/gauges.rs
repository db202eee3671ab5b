//! The pool's gauges, sampled every `metrics_interval` rather than kept up to date on every
//! change, so that calls pay nothing for them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::inner::PoolInner;
use crate::member::MemberState;
use crate::metrics as names;

impl PoolInner {
    /// Sets the pool's gauges from its state now: connections per endpoint by state, and
    /// streams in flight. Sampled rather than kept up to date on every change, so calls pay
    /// nothing for them.
    pub(crate) fn sample_gauges(&self) {
        let pool = self.config.name.clone();
        for entry in self.endpoints.load().iter() {
            let members = entry.members();
            let ready = members.iter().filter(|m| m.state() == MemberState::Ready).count();
            let open = entry.shared.open_connections.load(Ordering::Relaxed);
            let connecting = entry.lock().connecting;
            let endpoint = entry.label().to_owned();
            for (state, count) in
                [("ready", ready), ("draining", open.saturating_sub(ready)), ("connecting", connecting)]
            {
                metrics::gauge!(names::CONNECTIONS, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint.clone(), names::LABEL_STATE => state).set(count as f64);
            }
            metrics::gauge!(names::IN_FLIGHT, names::LABEL_POOL => pool.clone(), names::LABEL_ENDPOINT => endpoint).set(entry.in_flight() as f64);
        }
        if let Some(subset) = &self.subset {
            let (known, displaced) = {
                let subset = &subset.lock().unwrap_or_else(|e| e.into_inner()).choice;
                (subset.known(), subset.displaced(tokio::time::Instant::now()).len())
            };
            let live = self.endpoints.load().len();
            for (state, count) in [("known", known), ("live", live), ("displaced", displaced)] {
                metrics::gauge!(names::SUBSET_ENDPOINTS, names::LABEL_POOL => pool.clone(), names::LABEL_STATE => state).set(count as f64);
            }
        }
        if let Some(tokens) = &self.retry_tokens {
            metrics::gauge!(names::RETRY_TOKENS, names::LABEL_POOL => pool.clone()).set(tokens.tokens());
        }
        metrics::gauge!(names::WAITERS, names::LABEL_POOL => pool).set(self.waiters.len() as f64);
    }

    /// Samples the gauges every `interval` until the pool closes.
    pub(crate) fn spawn_gauge_sampler(self: &Arc<Self>, interval: Duration) {
        self.spawn_periodic(interval, |pool| pool.sample_gauges());
    }
}
