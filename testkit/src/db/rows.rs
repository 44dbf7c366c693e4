//! Rows as a test writes them (`Row`, a builder of one producer row) and as it reads them
//! back (`DbRow`, every column the relay touches).

#[derive(Debug, Clone)]
pub struct Row {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub destination: Option<String>,
    pub payload: serde_json::Value,
    pub headers: serde_json::Value,
}

impl Row {
    pub fn new(aggregate_id: &str, seq: usize) -> Row {
        Row {
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "order.updated".into(),
            destination: None,
            payload: serde_json::json!({"orderId": aggregate_id, "seq": seq, "total": 12.5}),
            headers: serde_json::json!({"traceparent": format!("00-{:032x}-{:016x}-01", seq, seq), "correlation_id": format!("c-{seq}")}),
        }
    }

    /// `per` rows of each of the aggregates `order-0` … `order-<aggregates - 1>`, inserted
    /// round-robin (seq 0 of every aggregate, then seq 1, …).
    pub fn grid(per: usize, aggregates: usize) -> Vec<Row> {
        (0..per)
            .flat_map(|seq| (0..aggregates).map(move |a| Row::new(&format!("order-{a}"), seq)))
            .collect()
    }

    /// Rows `a` and `b` to `to` (`None`: the sink's default) with `typo`'s first row
    /// between them to `missing` (where a row cannot go): how the "missing destination"
    /// scenarios open.
    pub fn typo_between(to: Option<&str>, missing: &str) -> Vec<Row> {
        let good = |a: &str| match to {
            Some(to) => Row::new(a, 0).to(to),
            None => Row::new(a, 0),
        };
        vec![good("a"), Row::new("typo", 0).to(missing), good("b")]
    }

    pub fn to(mut self, topic: &str) -> Row {
        self.destination = Some(topic.into());
        self
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DbRow {
    pub id: i64,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub processed: bool,
    pub payload: String,
    pub headers: serde_json::Value,
}

impl DbRow {
    /// The row's `headers` (a JSON object of strings) as (name, value) pairs.
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .as_object()
            .expect("headers object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string header").to_string()))
            .collect()
    }

    /// The headers SPEC §2 has a broker carry for the row: its own (`header_pairs`), then
    /// `event_id`, `event_type`, `aggregate_type` and `aggregate_id`.
    pub fn spec_headers(&self) -> Vec<(String, String)> {
        let mut out = self.header_pairs();
        for (k, v) in [
            ("event_id", &self.event_id),
            ("event_type", &self.event_type),
            ("aggregate_type", &self.aggregate_type),
            ("aggregate_id", &self.aggregate_id),
        ] {
            out.push((k.to_string(), v.clone()));
        }
        out
    }
}
