//! Rendering of the figures: number formatting and the final Markdown table.

use crate::cli::Args;
use crate::figures::{Figures, ProducerRuns, Producers, SinkFigures};
use crate::procs::{self, CpuSplit};

/// 12345.6 → "12 346".
pub fn int(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn pct(x: f64, of: f64) -> String {
    format!("{:.0} %", 100.0 * x / of)
}

pub fn print_table(args: &Args, f: &Figures) {
    let sinks: Vec<(&str, &SinkFigures)> = f.sinks.iter().map(|(k, s)| (k.title(), s)).collect();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let cell = |s: &SinkFigures, v: Option<String>| -> String {
        match (&s.skipped, v) {
            (Some(why), _) => format!("skipped ({})", why.replace('|', "/")),
            (None, Some(v)) => v,
            (None, None) => "—".into(),
        }
    };
    let mut row = |label: String, get: &dyn Fn(&SinkFigures) -> Option<String>| {
        let cells = sinks.iter().map(|(_, s)| cell(s, get(s))).collect();
        rows.push((label, cells));
    };
    let w = args.window;
    row(
        format!("raw broker ceiling: bare publisher, persistent, confirms, window {w}; best of 2 runs (msg/s)"),
        &|s| s.ceiling.map(int),
    );
    row(
        format!("Postgres ceiling: claim + mark, {w}-row batches, no broker (rows/s)"),
        &|_| f.pg_ceiling.map(int),
    );
    row(
        format!(
            "**drain** {} preloaded rows (rows/s)",
            int(args.rows as f64)
        ),
        &|s| {
            s.drain.as_ref().map(|d| match d.rows == args.rows {
                true => format!("**{}**", int(d.rate())),
                false => format!("**{}** ({} rows)", int(d.rate()), int(d.rows as f64)),
            })
        },
    );
    row(
        "drain from the first row's mark (relay start-up left out): start-up s / rows/s".into(),
        &|s| {
            let d = s.drain.as_ref()?;
            Some(format!("{:.2} s / {}", d.startup, int(d.steady_rate())))
        },
    );
    row("drain ÷ raw broker ceiling".into(), &|s| {
        Some(pct(s.drain.as_ref()?.rate(), s.ceiling?))
    });
    row("drain ÷ Postgres ceiling".into(), &|s| {
        Some(pct(s.drain.as_ref()?.rate(), f.pg_ceiling?))
    });
    row("drain ÷ min(broker, Postgres) ceiling".into(), &|s| {
        let c = match (s.ceiling, f.pg_ceiling) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            _ => return None,
        };
        Some(pct(s.drain.as_ref()?.rate(), c))
    });
    row("drain: relay peak RSS / CPU".into(), &|s| {
        let d = s.drain.as_ref()?;
        Some(format!(
            "{:.1} MB / {:.1} s ({:.0} µs/row)",
            d.usage.peak_rss_mb,
            d.usage.cpu_secs,
            1e6 * d.usage.cpu_secs / d.rows as f64
        ))
    });
    row(
        "drain: WAL bytes per row (full-page images per row) / HOT share of the relay's updates"
            .into(),
        &|s| {
            let d = s.drain.as_ref()?;
            Some(format!(
                "{:.0} B ({:.3}) / {}",
                d.wal_per_row,
                d.fpi_per_row,
                d.hot_share
                    .map_or("—".into(), |h| format!("{:.0} %", 100.0 * h))
            ))
        },
    );
    row("drain: CPU (% of one core) of relay / its Postgres backends (all Postgres) / broker / whole machine".into(), &|s| {
        let d = &s.drain.as_ref()?.split;
        Some(split_cell(d))
    });
    row(
        format!(
            "**latency** commit → consumer at {} rows/s offered, {} producers: p50 / p99 / max",
            int(args.latency_rate),
            args.producers
        ),
        &|s| {
            let l = s.latency.as_ref()?;
            let lat = format!("**{:.1} / {:.1} / {:.0} ms**", l.p50, l.p99, l.max);
            // The emulated SQS is offered less (`--sqs-latency-rate`): say so in its cell.
            Some(if l.offered == args.latency_rate {
                lat
            } else {
                format!("{lat} at {} rows/s offered", int(l.offered))
            })
        },
    );
    row(
        "latency floor: a bare publisher → the same consumer at the same rate (no database, no relay): p50 / p99 / max"
            .into(),
        &|s| {
            let (a, b, c) = s.floor?;
            Some(format!("{a:.1} / {b:.1} / {c:.0} ms"))
        },
    );
    row(
        "latency in the database: created_at → processed_at (confirm + mark): p50 / p99 / max"
            .into(),
        &|s| {
            let (a, b, c) = s.latency.as_ref()?.db_side;
            Some(format!("{a:.1} / {b:.1} / {c:.0} ms"))
        },
    );
    row("latency: rows achieved (rows/s), missing".into(), &|s| {
        let l = s.latency.as_ref()?;
        Some(format!(
            "{} ({}/s), {} missing",
            l.committed,
            int(l.achieved),
            l.missing
        ))
    });
    row("latency: relay peak RSS / CPU".into(), &|s| {
        let l = s.latency.as_ref()?;
        Some(format!(
            "{:.1} MB / {:.1} s ({:.0} % of a core)",
            l.usage.peak_rss_mb,
            l.usage.cpu_secs,
            100.0 * l.split.relay / l.split.wall.max(1e-9)
        ))
    });
    row("latency: CPU (% of one core) of relay / its Postgres backends (all Postgres) / broker / whole machine".into(), &|s| {
        Some(split_cell(&s.latency.as_ref()?.split))
    });
    row(
        format!(
            "**idle relay**, empty table, {:.0} s: transactions/s of its sessions (the server's count) / CPU (% of one core) of relay / its Postgres backends",
            args.idle_secs
        ),
        &|s| {
            let i = s.idle.as_ref()?;
            let pct = |x: f64| 100.0 * x / i.split.wall.max(1e-9);
            Some(format!(
                "**{:.1}** / {:.1} % / {:.1} %",
                i.transactions_per_sec,
                pct(i.split.relay),
                pct(i.split.postgres_ours)
            ))
        },
    );
    row(
        format!(
            "textbook relay, {} rows (rows/s)",
            int(args.naive_rows as f64)
        ),
        &|s| s.naive.map(|(r, t)| int(r as f64 / t)),
    );
    row("**outbox-relay ÷ textbook relay**".into(), &|s| {
        let (r, t) = s.naive?;
        Some(format!(
            "**{:.0}×**",
            s.drain.as_ref()?.rate() / (r as f64 / t)
        ))
    });
    type Shape = fn(&Producers) -> &ProducerRuns;
    let shapes: [(&str, Shape); 2] = [
        ("one outbox row per transaction", |p| &p.outbox_only),
        ("a business row + an outbox row per transaction", |p| {
            &p.with_business_row
        }),
    ];
    for (shape, runs) in shapes {
        row(
            format!(
                "producer commits/s, {} producers flat out, {shape}: bare SPEC §1 table / relay schema, no relay (÷ bare) / the same, order lock off (÷ bare) / relay schema, relay draining (÷ bare)",
                args.producers
            ),
            &|_| {
                Some(runs(f.producers.as_ref()?).means().summary())
            },
        );
    }

    let mut errors: Vec<String> = Vec::new();
    for (n, s) in &sinks {
        for e in &s.errors {
            errors.push(format!("{n} {e}"));
        }
    }

    println!();
    println!(
        "Machine: {} × {}, {:.1} GiB RAM; PostgreSQL {}; Postgres, broker, relay and bench on the same host; load average {} at start, {} at end. {}.",
        procs::nproc(),
        procs::cpu_model(),
        procs::mem_total_gb(),
        f.pg_version,
        f.load_start,
        procs::load_average(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!(
        "Rows: {}-byte JSON payloads (as read), 1 traceparent header, {} aggregates (pseudo-random per row).",
        f.payload_avg as usize, args.aggregates
    );
    if args.relays > 1 {
        println!("Drains by {} relay processes together.", args.relays);
    }
    if !args.relay_env.is_empty() {
        println!("Relay env: {}", args.relay_env.join(" "));
    }
    if args.no_listen {
        println!("Latency run without NOTIFY wake-ups (relay.listen = false).");
    }
    println!();
    let header: Vec<&str> = sinks.iter().map(|(n, _)| *n).collect();
    println!("| figure | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(header.len()));
    for (label, cells) in rows {
        println!("| {label} | {} |", cells.join(" | "));
    }
    for e in errors {
        println!("\nERROR {e}");
    }
}

fn split_cell(d: &CpuSplit) -> String {
    let w = d.wall.max(1e-9);
    format!(
        "{:.0} % / {:.0} % ({:.0} %) / {:.0} % / {:.0} %",
        100.0 * d.relay / w,
        100.0 * d.postgres_ours / w,
        100.0 * d.postgres_all / w,
        100.0 * d.broker / w,
        100.0 * d.machine / w,
    )
}
