//! Wake-ups: LISTEN on the table's NOTIFY channel and poke the relay loop. Notifications
//! sent while the listener reconnects are lost (sqlx says so), which is why the loop also
//! polls on `status` every `poll_interval`: this is only the fast path.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::secret::Secret;

/// Listen until cancelled; every notification (and every reconnect, since one may have
/// been missed) wakes the loop.
pub async fn listen(url: Secret, channel: String, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut pacer = super::backoff::Pacer::default();
    while !cancel.is_cancelled() {
        let listener = async {
            // Named like the pool's connections, so operators (and the fault tests) find it in
            // pg_stat_activity.
            let opts = crate::store::connect_options(url.expose())
                .map_err(|e| e.to_string())?
                .application_name("outbox-relay");
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(opts);
            let mut l = PgListener::connect_with(&pool)
                .await
                .map_err(|e| e.to_string())?;
            l.listen(&channel).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(l)
        };
        let mut listener = match tokio::select! {
            _ = cancel.cancelled() => return,
            l = listener => l,
        } {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %crate::secret::redact_url(&e), "LISTEN failed; polling covers it");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pacer.next_pause()) => {}
                }
                continue;
            }
        };
        pacer.reset();
        wake.notify_one();
        loop {
            let got = tokio::select! {
                _ = cancel.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match got {
                Ok(Some(_)) => wake.notify_one(),
                // Connection lost: sqlx reconnects on the next call; something may have
                // been missed, so wake the loop for a claim.
                Ok(None) => wake.notify_one(),
                Err(e) => {
                    tracing::debug!(error = %e, "LISTEN connection failed");
                    break;
                }
            }
        }
    }
}
