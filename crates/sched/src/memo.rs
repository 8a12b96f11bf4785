//! The best nodes of the last full scan, kept so that the next identical request
//! need not scan again.
//!
//! A burst is mostly one shape many times (an application's replicas, a fleet-wide
//! rollout), and each placement changes one node. For a request whose filters and
//! score read only the node itself and what does not change (no group rules in force,
//! no region or location, the same offline recommendations: [`crate::online`]
//! decides), a node's verdict changes only when the node does. So a full scan keeps its best [`KEEP`] nodes, and every node changed since
//! (reserved, released, cordoned) is looked at again: the best of that list is the
//! best of the cluster, exactly what a full scan would return (ties included), at the
//! cost of a few nodes instead of all of them. At 100,000 nodes a full scan is about a
//! third of a millisecond (docs/BENCHMARKS.md), so a burst of 100,000 placements
//! spent half a minute of CPU on scans.
//!
//! Every node left out of the list ranks below its last entry (the *boundary*); a
//! changed node goes back in only if it ranks above it. When the list runs out, the
//! next request scans again.

use std::cmp::Ordering;

use crate::online::Request;

/// Nodes kept from a full scan.
pub(crate) const KEEP: usize = 64;
/// Changed nodes looked at again before a full scan is cheaper to trust.
const TOUCHED_MAX: usize = 4096;

/// A node and its score.
pub(crate) type Ranked = (u32, f32);

/// Whether `a` ranks above `b`: a higher score, or the same score at a lower index
/// (the order in which a full scan keeps the first best it meets).
pub(crate) fn above(a: Ranked, b: Ranked) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

fn rank(a: &Ranked, b: &Ranked) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// The best nodes of a scan, gathered as it goes (nodes in increasing index order).
pub(crate) struct Top {
    list: Vec<Ranked>,
    /// Set once something was left out: everything left out ranks below it.
    boundary: Option<Ranked>,
}

impl Top {
    pub(crate) fn new() -> Self {
        Self {
            list: Vec::with_capacity(2 * KEEP),
            boundary: None,
        }
    }

    /// Offer a feasible node (in increasing index order).
    #[inline(always)]
    pub(crate) fn offer(&mut self, node: u32, score: f32) {
        // A later node with the boundary's score has a higher index: it ranks below.
        if self.boundary.is_some_and(|b| score <= b.1) {
            return;
        }
        self.list.push((node, score));
        if self.list.len() == 2 * KEEP {
            self.cut();
        }
    }

    fn cut(&mut self) {
        self.list.sort_unstable_by(rank);
        if self.list.len() > KEEP {
            self.list.truncate(KEEP);
            self.boundary = self.list.last().copied();
        }
    }

    /// The best node, and the memo to keep for `req` scored with the recommendations
    /// `rec` (their id).
    pub(crate) fn finish(mut self, req: &Request, rec: Option<u64>) -> (Option<Ranked>, Memo) {
        self.cut();
        (
            self.list.first().copied(),
            Memo {
                req: req.clone(),
                rec,
                list: self.list,
                boundary: self.boundary,
                touched: Vec::new(),
            },
        )
    }
}

/// What a full scan for `req` left.
#[derive(Debug)]
pub(crate) struct Memo {
    req: Request,
    rec: Option<u64>,
    list: Vec<Ranked>,
    boundary: Option<Ranked>,
    /// Nodes changed since.
    touched: Vec<u32>,
}

impl Memo {
    /// The best node for `req` scored with the recommendations `rec`, judging each
    /// changed node with `judge` (its score, or `None` if it no longer fits); `None`
    /// when this memo cannot say (another request or recommendations, too many
    /// changes, or the list ran out) and a full scan must.
    pub(crate) fn best(
        &mut self,
        req: &Request,
        rec: Option<u64>,
        mut judge: impl FnMut(u32) -> Option<f32>,
    ) -> Option<(Ranked, usize)> {
        if self.req != *req || self.rec != rec || self.touched.len() > TOUCHED_MAX {
            return None;
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &node in &touched {
            self.list.retain(|(n, _)| *n != node);
            let Some(score) = judge(node) else { continue };
            if self.boundary.is_none_or(|b| above((node, score), b)) {
                let at = self.list.partition_point(|r| above(*r, (node, score)));
                self.list.insert(at, (node, score));
            }
        }
        Some((*self.list.first()?, touched.len()))
    }
}

/// The cluster's memo, if any. Cloning a cluster leaves it behind.
#[derive(Default)]
pub(crate) struct MemoSlot(std::sync::Mutex<Option<Memo>>);

impl MemoSlot {
    /// The memo, to read or replace.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Memo>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Node `i` changed.
    pub(crate) fn touch(&mut self, i: u32) {
        if let Some(m) = self.0.get_mut().unwrap_or_else(|e| e.into_inner()) {
            m.touched.push(i);
        }
    }

    /// The set of nodes changed: nothing kept holds.
    pub(crate) fn forget(&mut self) {
        *self.0.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Clone for MemoSlot {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for MemoSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoSlot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_keeps_its_best_in_rank_order_and_the_rest_rank_below_the_boundary() {
        let mut top = Top::new();
        // Scores cycle, so ties are everywhere: the lower index must win them.
        for i in 0..1000u32 {
            top.offer(i, (i % 37) as f32);
        }
        let (best, memo) = top.finish(&Request::default(), None);
        assert_eq!(best, Some((36, 36.0)));
        assert_eq!(memo.list.len(), KEEP);
        let mut all: Vec<Ranked> = (0..1000u32).map(|i| (i, (i % 37) as f32)).collect();
        all.sort_by(rank);
        assert_eq!(memo.list, all[..KEEP]);
        assert_eq!(memo.boundary, Some(all[KEEP - 1]));
    }

    #[test]
    fn a_changed_node_is_judged_again_and_the_list_running_out_asks_for_a_scan() {
        let req = Request::default();
        let mut top = Top::new();
        for i in 0..3u32 {
            top.offer(i, 1.0 + i as f32);
        }
        let (_, mut memo) = top.finish(&req, Some(7));
        assert_eq!(memo.boundary, None, "every feasible node was kept");
        // Node 2 (the best) filled up, node 0 became the best.
        memo.touched.extend([2, 0, 2]);
        let judge = |n| match n {
            2 => None,
            0 => Some(9.0),
            _ => unreachable!("only changed nodes are judged"),
        };
        assert_eq!(memo.best(&req, Some(7), judge), Some(((0, 9.0), 2)));
        // Other recommendations: a scan must say.
        assert_eq!(memo.best(&req, Some(8), |_| unreachable!()), None);
        // Another request does not use it.
        let other = Request {
            max_per_node: Some(1),
            ..Request::default()
        };
        assert_eq!(memo.best(&other, Some(7), |_| unreachable!()), None);
        // Every kept node gone: a full scan must say.
        memo.touched.extend([0, 1]);
        assert_eq!(memo.best(&req, Some(7), |_| None), None);
    }
}
