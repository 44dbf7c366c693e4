//! Ordering within a claimed batch: messages are published in *waves*, wave `k` holding
//! the `k`-th message of each aggregate. A wave is sent only after the previous wave's
//! confirms are in, and a message is dropped from its wave when an earlier message of its
//! aggregate was not confirmed — so a rejected or unsent row always holds back the later
//! rows of its own aggregate, and only those.

use std::collections::HashMap;

use crate::model::Message;

/// Split messages (already in `id` order) into waves.
pub fn plan(messages: Vec<Message>) -> Vec<Vec<Message>> {
    // Rank of each message within its aggregate, computed on borrowed keys (this runs
    // for every claimed row), then the messages are moved into their waves.
    let ranks: Vec<usize> = {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        messages
            .iter()
            .map(|m| {
                let k = seen.entry(m.aggregate()).or_insert(0);
                *k += 1;
                *k - 1
            })
            .collect()
    };
    let mut waves: Vec<Vec<Message>> = Vec::new();
    for (m, k) in messages.into_iter().zip(ranks) {
        if waves.len() <= k {
            waves.push(Vec::new());
        }
        waves[k].push(m);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sample_row;

    #[test]
    fn waves_keep_each_aggregate_in_order() {
        let ids_aggs = [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "a"), (6, "b")];
        let msgs = ids_aggs
            .iter()
            .map(|(id, a)| sample_row(*id, a).to_message().unwrap())
            .collect();
        let waves = plan(msgs);
        let ids: Vec<Vec<i64>> = waves
            .iter()
            .map(|w| w.iter().map(|m| m.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 2, 4], vec![3, 6], vec![5]]);
    }
}
