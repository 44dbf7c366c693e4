//! The Kafka topics a test made on the shared broker (`TestTopics`): deleted by `delete`
//! at the end of the test, or on drop if the test panics first.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// Topics by name on `brokers`, removed by `delete`.
pub struct TestTopics {
    brokers: String,
    names: Vec<String>,
}

impl TestTopics {
    /// Track `names` (created by the test, or that the relay may have written to).
    pub fn new(brokers: &str, names: &[&str]) -> Self {
        Self {
            brokers: brokers.to_string(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// Delete the topics (errors ignored: a topic may not exist). Close every consumer
    /// of them first: one still assigned to a topic being deleted crashed a test once.
    pub async fn delete(&self) {
        delete_topics(self.brokers.clone(), self.names.clone()).await;
    }
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        let what = format!("Kafka topics {:?}", self.names);
        crate::teardown::after_panic(
            what,
            delete_topics(self.brokers.clone(), self.names.clone()),
        );
    }
}

async fn delete_topics(brokers: String, names: Vec<String>) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create();
    let Ok(admin) = admin else {
        return;
    };
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let _ = admin.delete_topics(&refs, &opts).await;
    // Dropping a client blocks on its threads: off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
}
