//! The latency floor: what the broker alone adds between a publisher and a consumer. A
//! bare publisher (the relay's own client settings, no database, no relay) sends the
//! latency phase's messages at the same offered rate, and the same consumer notes their
//! arrival; the relay's commit → consumer figures read against it. RabbitMQ and Kafka.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use uuid::Uuid;

use crate::bench::Bench;
use crate::figures::Kind;
use crate::rabbit::Arrivals;

/// Send `rate × secs` messages at `rate` per second (message `i` due `i / rate` s after
/// the start), noting when each was handed over; `send(i, id)` hands message `i` over
/// without waiting for the broker's answer.
async fn paced<S, F>(rate: f64, secs: f64, mut send: S) -> Result<Vec<(Uuid, Instant)>>
where
    S: FnMut(u64, Uuid) -> F,
    F: Future<Output = Result<()>>,
{
    let n = (rate * secs).max(1.0) as u64;
    let start = Instant::now();
    let mut sent = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let id = Uuid::new_v4();
        let at = Instant::now();
        send(i, id).await?;
        sent.push((id, at));
    }
    Ok(sent)
}

/// Milliseconds from each send to its arrival, sorted, once every message arrived or
/// 15 s passed; and how many never arrived.
pub async fn waited(sent: &[(Uuid, Instant)], seen: &Arrivals) -> (Vec<f64>, usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = {
            let s = seen.lock().await;
            sent.iter().filter(|(id, _)| s.contains_key(id)).count()
        };
        if got == sent.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = seen.lock().await;
    let mut lat: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            s.get(id)
                .map(|got| got.saturating_duration_since(*at).as_secs_f64() * 1e3)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let missing = sent.len() - lat.len();
    (lat, missing)
}

/// p50, p99 and max of sorted `lat`.
pub fn percentiles(lat: &[f64]) -> Result<(f64, f64, f64)> {
    if lat.is_empty() {
        bail!("no message arrived");
    }
    let q = |p: f64| lat[((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok((q(0.50), q(0.99), q(1.0)))
}

impl Bench {
    /// The latency floor of `kind` at its latency phase's rate: (p50, p99, max) ms, or
    /// `None` for a broker without one here.
    pub async fn latency_floor(&self, kind: Kind) -> Result<Option<(f64, f64, f64)>> {
        let (rate, secs) = (self.rate_for(kind), self.args.latency_secs);
        let (sent, seen, consumer) = match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                r.purge().await?;
                let (seen, consumer) = r.arrivals().await?;
                let publisher = r.publisher().await?;
                let sent = paced(rate, secs, |i, id| {
                    publisher.send(id, self.aggregate(i), &self.payload)
                })
                .await?;
                (sent, seen, consumer)
            }
            Kind::Kafka => {
                let k = self.kafka()?;
                let topic = k.topic(&format!("{}_floor", self.prefix)).await?;
                let (seen, consumer) = k.arrivals(&topic).await?;
                k.warm(&topic, &seen).await?;
                let publisher = k.publisher(&topic)?;
                // Its producer id and metadata first: the relay's producer has them
                // long before a latency run's rows.
                publisher.send(Uuid::new_v4(), "warm", "{}")?;
                publisher.flush()?;
                let sent = paced(rate, secs, |i, id| {
                    std::future::ready(publisher.send(id, &self.aggregate(i), &self.payload))
                })
                .await?;
                publisher.flush()?;
                (sent, seen, consumer)
            }
            _ => return Ok(None),
        };
        let (lat, missing) = waited(&sent, &seen).await;
        consumer.abort();
        if let (Some(r), Kind::Rabbit) = (&self.rabbit, kind) {
            r.purge().await?;
        }
        if missing > 0 {
            bail!("{missing} of {} floor messages never arrived", sent.len());
        }
        percentiles(&lat).map(Some)
    }
}
