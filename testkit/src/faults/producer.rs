//! Order-service-like writers (`Producer`) that keep committing rows while the database
//! is attacked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

/// Writers that keep committing rows, one per transaction, over `aggregates` aggregates
/// (each aggregate written by one task, so its ids follow its commit order), riding out a
/// database that goes away.
pub struct Producer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Producer {
    /// `tasks` writers; each sleeps `pace` between its commits (ZERO = flat out).
    pub fn start(
        pool: &PgPool,
        table: &str,
        aggregates: usize,
        tasks: usize,
        pace: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let handles = (0..tasks)
            .map(|p| {
                let (pool, table) = (pool.clone(), table.to_string());
                let (stop, committed, errors) = (stop.clone(), committed.clone(), errors.clone());
                tokio::spawn(async move {
                    let mine: Vec<usize> = (0..aggregates).filter(|a| a % tasks == p).collect();
                    let sql = format!(
                        "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, payload, headers)
                         VALUES ('order', $1, 'order.updated', $2, $3)"
                    );
                    let mut seq = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        let agg = format!("agg-{}", mine[seq % mine.len()]);
                        let res = async {
                            let mut tx = pool.begin().await?;
                            sqlx::query(&sql)
                                .bind(&agg)
                                .bind(serde_json::json!({"orderId": agg, "seq": seq}))
                                .bind(serde_json::json!({"correlation_id": format!("c-{p}-{seq}")}))
                                .execute(&mut *tx)
                                .await?;
                            tx.commit().await
                        }
                        .await;
                        match res {
                            Ok(()) => {
                                committed.fetch_add(1, Ordering::SeqCst);
                                seq += 1;
                                if !pace.is_zero() {
                                    tokio::time::sleep(pace).await;
                                }
                            }
                            Err(_) => {
                                // Database away: retry (the row may or may not have been
                                // committed — the table is the ledger's truth).
                                errors.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            committed,
            errors,
            tasks: handles,
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    /// Stop and wait for the writers; returns (commits seen, failed tries).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.committed.load(Ordering::SeqCst),
            self.errors.load(Ordering::SeqCst),
        )
    }
}
