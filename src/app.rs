//! Wiring for `outbox-relay run`: one `CancellationToken` from SIGTERM/SIGINT, a
//! `TaskTracker` for every task, a shutdown deadline, and the start-up checks (database
//! reached with backoff, schema version) that make `/readyz` green.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::health::Health;
use crate::maintenance;
use crate::metrics as m;
use crate::relay::backoff::Pacer;
use crate::relay::Relay;
use crate::store::{Store, StoreError};
use crate::wiring::{build_sink, instance_id, AppError};

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    token
}

/// Open the pool and wait (with backoff, until cancelled) for the database; then check
/// the schema. `Ok(None)` when cancelled first.
pub async fn open_store(
    settings: &Settings,
    cancel: &CancellationToken,
) -> Result<Option<Store>, AppError> {
    let table = settings.table()?;
    let connect = || Store::connect(&settings.database, table.clone());
    let Some(store) = while_unreachable(cancel, connect).await? else {
        return Ok(None);
    };
    let mut conn = store.pool().acquire().await.map_err(StoreError::from)?;
    crate::migrate::check_schema(&mut conn, &table).await?;
    // A missing grant or a session read-only by setting is the operator's to fix; a
    // standby (a failover under way) is waited out like an unreachable database.
    crate::migrate::check_access(&mut conn, &table, true).await?;
    metrics::gauge!(m::DATABASE_UP).set(1.0);
    Ok(Some(store))
}

/// Run `f` until it succeeds or fails for a reason other than the database being
/// unreachable (returned), pausing with backoff between tries (`database_up` is 0
/// meanwhile). `Ok(None)` when cancelled first.
async fn while_unreachable<T, F, Fut>(
    cancel: &CancellationToken,
    mut f: F,
) -> Result<Option<T>, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pacer = Pacer::default();
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_unavailable() => {
                metrics::gauge!(m::DATABASE_UP).set(0.0);
                let pause = pacer.next_pause();
                tracing::warn!(error = %e, ?pause, "database unreachable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `outbox-relay run`: bind `http.listen`, then run until SIGTERM or SIGINT.
pub async fn run_until_signalled(settings: Settings) -> Result<(), AppError> {
    let addr = settings.http_listen()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Usage(format!("http.listen {addr}: {e}")))?;
    run(settings, listener, shutdown_token()).await
}

/// The daemon: serve `/livez`, `/readyz` and `/metrics` on `listener`, relay, and run
/// the maintenance services until `shutdown` is cancelled; then stop within
/// `relay.shutdown_timeout`. Tests run it in-process on an ephemeral port.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let cancel = shutdown;
    let metrics = m::install().map_err(AppError::Runtime)?;
    let stall_after = (settings.relay.poll_interval * 10)
        .max(settings.relay.effective_publish_timeout() * 3)
        .max(Duration::from_secs(60));
    let health = Arc::new(Health::new(stall_after));
    health.beat();
    let http = crate::http::serve(listener, health.clone(), metrics, cancel.clone());

    let Some(store) = open_store(&settings, &cancel).await? else {
        return Ok(());
    };
    health.set_ready();
    if settings.relay.on_failed == crate::config::OnFailed::Skip {
        // Rows parked behind FAILED rows by a run in block mode go on now (the database
        // may blink meanwhile: wait for it as at start).
        let Some(n) = while_unreachable(&cancel, || store.unpark_all()).await? else {
            return Ok(());
        };
        if n > 0 {
            tracing::info!(
                rows = n,
                "on_failed = skip: un-parked rows held behind FAILED rows"
            );
        }
    }
    let instance = instance_id();
    tracing::info!(%instance, table = %store.table(), sink = %settings.sink.kind, "relay starting");

    let tracker = TaskTracker::new();
    let bell = if settings.relay.listen {
        let (channel, key) = store.wake_names().await?;
        let (bell, wire) = crate::relay::wake::pair();
        tracker.spawn(crate::relay::wake::listen(
            settings.database.url.clone(),
            channel,
            key,
            wire,
            cancel.clone(),
        ));
        bell
    } else {
        crate::relay::wake::Bell::default()
    };
    tracker.spawn(maintenance::run(
        store.clone(),
        instance.clone(),
        settings.relay.retention,
        settings.relay.on_failed,
        cancel.clone(),
    ));
    let sink = build_sink(&settings)?;
    let relay = Relay::new(store, sink, settings.relay.clone(), instance, bell, health);
    tracker.spawn(relay.run(cancel.clone()));
    tracker.close();

    cancel.cancelled().await;
    if tokio::time::timeout(settings.relay.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?settings.relay.shutdown_timeout, "shutdown deadline passed; unconfirmed rows stay PENDING for the next run");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), http).await;
    tracing::info!("stopped");
    Ok(())
}
