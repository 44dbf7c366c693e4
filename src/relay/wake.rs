//! Wake-ups: LISTEN on the table's NOTIFY channel and poke the relay loop; and, on the
//! same connection, the doorbell (`store::doorbell`): while the engine asks for wake-ups
//! this task holds the advisory locks that make producers' commits notify. Notifications
//! sent while the listener reconnects are lost (sqlx says so), and the locks go with the
//! connection, which is why the loop also polls: this is only the fast path.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::Acquire;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::secret::Secret;
use crate::store::doorbell::{self, Rung};

/// After a producer held a slot: try again this soon, doubling up to `BUSY_RETRY_MAX`
/// while it stays held (a producer transaction left open after its insert).
const BUSY_RETRY: Duration = Duration::from_millis(20);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(1);
/// While another instance holds the bell: try again this often (it may stop listening).
const COVERED_RETRY: Duration = Duration::from_millis(250);

/// Whether producers' commits notify, as this instance sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ring {
    /// They do not (not asked for, not taken yet, or the connection is down).
    #[default]
    Off,
    /// This instance holds the bell.
    Held,
    /// Another instance holds it; this one hears the notifications on the same channel.
    Covered,
}

/// The engine's end: wake-ups, and the bell it asks for. Without a line (`relay.listen`
/// off, or a relay without a LISTEN task) nothing is ever asked.
#[derive(Default)]
pub struct Bell {
    pub woken: Arc<Notify>,
    line: Option<(watch::Sender<bool>, watch::Receiver<Ring>)>,
}

/// The LISTEN task's end.
pub struct Wire {
    woken: Arc<Notify>,
    want: watch::Receiver<bool>,
    ring: watch::Sender<Ring>,
}

#[cfg(test)]
impl Wire {
    /// What the engine asks for.
    pub fn asked(&self) -> bool {
        *self.want.borrow()
    }

    /// Pretend the connection now holds `r`.
    pub fn set(&self, r: Ring) {
        self.ring.send_replace(r);
    }
}

/// A connected pair.
pub fn pair() -> (Bell, Wire) {
    let woken = Arc::new(Notify::new());
    let (want_tx, want_rx) = watch::channel(false);
    let (ring_tx, ring_rx) = watch::channel(Ring::Off);
    (
        Bell {
            woken: woken.clone(),
            line: Some((want_tx, ring_rx)),
        },
        Wire {
            woken,
            want: want_rx,
            ring: ring_tx,
        },
    )
}

impl Bell {
    /// Whether there is a LISTEN task to ask.
    pub fn wired(&self) -> bool {
        self.line.is_some()
    }

    /// Ask for the bell (or let it go).
    pub fn ask(&self, want: bool) {
        if let Some((tx, _)) = &self.line {
            tx.send_if_modified(|w| std::mem::replace(w, want) != want);
        }
    }

    /// What the LISTEN task holds now.
    pub fn ring(&self) -> Ring {
        self.line.as_ref().map_or(Ring::Off, |(_, rx)| *rx.borrow())
    }
}

/// Listen until cancelled; every notification (and every reconnect, since one may have
/// been missed, and every time the bell is taken) wakes the loop.
pub async fn listen(
    url: Secret,
    channel: String,
    key: i32,
    mut wire: Wire,
    cancel: CancellationToken,
) {
    let mut pacer = super::backoff::Pacer::default();
    while !cancel.is_cancelled() {
        wire.ring.send_replace(Ring::Off);
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
        wire.woken.notify_one();
        let began = Instant::now();
        let served = serve(&mut listener, key, &mut wire, &cancel).await;
        if began.elapsed() > Duration::from_secs(10) {
            // A connection that lived: the next failure starts the pauses afresh (one that
            // fails at once keeps doubling them).
            pacer.reset();
        }
        if let Err(e) = served {
            tracing::debug!(error = %e, "LISTEN connection failed");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pacer.next_pause()) => {}
            }
        }
        if wire.want.has_changed().is_err() {
            // The engine is gone: nobody to wake.
            return;
        }
    }
}

/// One connection's life: notifications in, the bell taken and let go as asked.
async fn serve(
    listener: &mut PgListener,
    key: i32,
    wire: &mut Wire,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut held = Ring::Off;
    let mut retry_at = Instant::now();
    let mut busy_pause = BUSY_RETRY;
    loop {
        let want = *wire.want.borrow_and_update();
        if want && held != Ring::Held && Instant::now() >= retry_at {
            let conn = listener.acquire().await.map_err(|e| e.to_string())?;
            held = match doorbell::ring(conn, key).await.map_err(|e| e.to_string())? {
                Rung::Held => {
                    // A row committed before the bell was taken sent no notification.
                    wire.woken.notify_one();
                    busy_pause = BUSY_RETRY;
                    Ring::Held
                }
                Rung::Covered => {
                    retry_at = Instant::now() + COVERED_RETRY;
                    Ring::Covered
                }
                Rung::Busy => {
                    retry_at = Instant::now() + busy_pause;
                    busy_pause = (busy_pause * 2).min(BUSY_RETRY_MAX);
                    Ring::Off
                }
            };
        } else if !want && held != Ring::Off {
            busy_pause = BUSY_RETRY;
            if held == Ring::Held {
                let conn = listener.acquire().await.map_err(|e| e.to_string())?;
                doorbell::unring(conn).await.map_err(|e| e.to_string())?;
            }
            held = Ring::Off;
        }
        wire.ring
            .send_if_modified(|r| std::mem::replace(r, held) != held);
        let retrying = want && held != Ring::Held;
        let got = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            n = listener.try_recv() => n,
            changed = wire.want.changed() => {
                if changed.is_err() {
                    // The engine is gone.
                    return Ok(());
                }
                continue;
            }
            _ = tokio::time::sleep_until(retry_at), if retrying => continue,
        };
        match got {
            Ok(Some(_)) => wire.woken.notify_one(),
            // Connection lost: sqlx reconnects (and LISTENs again) on the next call, but the
            // bell went with the old session; something may have been missed, so wake the
            // loop for a claim.
            Ok(None) => {
                held = Ring::Off;
                retry_at = Instant::now();
                wire.ring.send_replace(Ring::Off);
                wire.woken.notify_one();
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
