//! A page scanned ahead: the next sweep scan, run beside a sweep claim's fetch so the two
//! statements overlap, and used by the sweep claim that follows if it is what that claim
//! would have scanned.

use super::aggkey::HashSet;
use super::claimer::Plan;
use crate::store::ScanPage;

/// The next sweep scan, run beside a sweep claim's fetch (the two statements overlap),
/// for the sweep claim that follows it.
#[derive(Debug)]
pub struct Ahead {
    pub generation: u64,
    pub after: i64,
    pub skip: HashSet<i32>,
    /// The type the page's scan left out (`Plan::skip_type`).
    pub skip_type: Option<String>,
    pub partitions: Option<Vec<i32>>,
    pub scan_limit: u32,
    pub examine: u32,
    pub page: ScanPage,
}

impl Ahead {
    /// Use the page for `plan` if it is what `plan`'s scan would have asked for: the same
    /// sweep generation, start, partitions and type passed over, and every aggregate the
    /// page's scan left out is capped in the plan too (the picker leaves out the others the plan caps).
    /// The page's own limits then decide whether it reached the end. The engine drops an
    /// ahead page when another scan (a refill) runs first, so the horizon sees the scans'
    /// probes in the order they ran.
    pub fn adopt(self, plan: &mut Plan) -> bool {
        let fits = !plan.is_refill()
            && plan.skip_type == self.skip_type
            && plan.generation == self.generation
            && plan.after == self.after
            && plan.partitions == self.partitions
            && self.skip.is_subset(&plan.capped);
        if fits {
            plan.scan_limit = self.scan_limit;
            plan.examine = self.examine;
            plan.ahead = Some(self.page);
        }
        fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::claimer::tests::plan;
    use crate::store::Scanned;

    #[test]
    fn a_page_scanned_ahead_is_used_only_where_the_plan_would_have_scanned_it() {
        let ahead = |after: i64, skip: &[i32]| Ahead {
            generation: 0,
            after,
            skip: skip.iter().copied().collect(),
            skip_type: None,
            partitions: None,
            scan_limit: 7,
            examine: 700,
            page: ScanPage {
                rows: vec![Scanned {
                    id: after + 1,
                    hash: 1,
                    size: 10,
                }],
                ..ScanPage::default()
            },
        };
        let mut p = plan(3, 100);
        p.after = 10;
        p.capped = [4, 5].into_iter().collect();
        assert!(
            ahead(10, &[4]).adopt(&mut p),
            "it skipped less than the plan caps"
        );
        assert_eq!((p.scan_limit, p.examine), (7, 700), "the page's own limits");
        assert_eq!(p.ahead.as_ref().map(|pg| pg.rows.len()), Some(1));
        let mut p = plan(3, 100);
        p.after = 10;
        assert!(!ahead(10, &[4]).adopt(&mut p), "4 is no longer capped");
        assert!(!ahead(9, &[]).adopt(&mut p), "another start");
        p.generation = 1;
        assert!(!ahead(10, &[]).adopt(&mut p), "the sweep started over");
        let mut p = plan(3, 100);
        p.after = 10;
        p.skip_type = Some("bulk".into());
        assert!(
            !ahead(10, &[]).adopt(&mut p),
            "a type is passed over since (the page has its rows)"
        );
        let mut p = plan(3, 100);
        p.after = 10;
        p.only = Some(vec![1]);
        assert!(!ahead(10, &[]).adopt(&mut p), "a refill scans for itself");
        assert!(p.ahead.is_none());
    }
}
