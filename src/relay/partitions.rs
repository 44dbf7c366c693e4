//! The engine's side of the partition leases: it takes each renewal's outcome (lost,
//! surplus and gained partitions), forgets the rows of partitions let go, and hands
//! surplus partitions back once nothing of theirs is out or being recorded.

use super::aggkey::HashSet;
use super::{Engine, Renewal};
use crate::metrics as m;
use crate::sink::Sink;
use crate::store::StoreError;

impl<S: Sink> Engine<S> {
    pub(super) fn on_renewed(
        &mut self,
        r: Result<Result<Renewal, StoreError>, tokio::task::JoinError>,
    ) {
        let renewal = match r {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.leases.retry_soon();
                return self.db_error("lease renew", &e);
            }
            Err(e) => {
                self.leases.retry_soon();
                return tracing::error!(error = %e, "lease task failed");
            }
        };
        metrics::gauge!(m::DATABASE_UP).set(1.0);
        let changes = self.leases.apply(renewal, &self.releasing);
        if !changes.lost.is_empty() {
            self.drop_partitions(&changes.lost);
        }
        if !changes.surplus.is_empty() {
            self.drop_partitions(&changes.surplus);
            self.releasing.extend(changes.surplus);
        }
        if changes.gained {
            // The sweep may be past rows of the new partitions: start it over.
            self.sweep.restart();
        }
        self.claim_due = true;
    }

    /// Forget the rows of partitions let go or lost. The sweep starts over (it must not
    /// skip ahead of rows that left memory), and rows of those aggregates brought by a
    /// claim already running are discarded when it lands.
    pub(super) fn drop_partitions(&mut self, parts: &HashSet<i32>) {
        let keys = self.window.drop_partitions(parts);
        self.dropped.extend(keys);
        self.sweep.restart();
    }

    /// Hand surplus partitions back once nothing of theirs is out or being recorded.
    pub(super) fn try_release(&mut self) {
        if self.releasing.is_empty() || self.release_task.is_some() {
            return;
        }
        let parts = &self.releasing;
        let part = |h: &i32| parts.contains(&(h & (crate::store::PARTITIONS - 1)));
        let busy = self.recording.values().any(part)
            || self.flights.values().any(|f| part(&f.hash))
            || self.window.out_in(parts) > 0;
        if busy {
            return;
        }
        let parts: Vec<i32> = self.releasing.iter().copied().collect();
        let (store, instance) = (self.store.clone(), self.leases.instance.clone());
        self.release_task = Some(tokio::spawn(async move {
            store.release_leases(&instance, &parts).await
        }));
    }

    pub(super) fn on_released(
        &mut self,
        r: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) {
        match r {
            Ok(Ok(())) => {
                tracing::info!(released = self.releasing.len(), "handed partitions back");
                self.releasing.clear();
            }
            Ok(Err(e)) => self.db_error("lease release", &e),
            Err(e) => tracing::error!(error = %e, "lease release task failed"),
        }
    }
}
