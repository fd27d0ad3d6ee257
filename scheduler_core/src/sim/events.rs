//! The simulator's future: events keyed by (time, insertion order), so equal times pop in the
//! order they were scheduled and a run never depends on anything but its inputs.
//!
//! Times are finite and non-negative, so their IEEE bits order like the numbers; the heap
//! compares integers.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum EventKind {
    /// The step in progress on an instance (dense index) ends.
    StepEnd(u32),
    /// A migration's bulk copy is done; the request pauses at its source's next step boundary.
    BulkCopied(u32),
    /// A migration's final copy is done; the request resumes on its target (or its source).
    Landed(u32),
    Tick,
}

#[derive(Copy, Clone, Debug)]
struct Event {
    time_bits: u64,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest event must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time_bits, other.seq).cmp(&(self.time_bits, self.seq))
    }
}

#[derive(Debug, Default)]
pub(super) struct EventQueue {
    heap: BinaryHeap<Event>,
    next_seq: u64,
}

impl EventQueue {
    pub fn push(&mut self, time: f64, kind: EventKind) {
        debug_assert!(time.is_finite() && time >= 0.0 && time.is_sign_positive(), "event time {time}");
        self.heap.push(Event { time_bits: time.to_bits(), seq: self.next_seq, kind });
        self.next_seq += 1;
    }

    pub fn peek_time(&self) -> Option<f64> {
        self.heap.peek().map(|e| f64::from_bits(e.time_bits))
    }

    pub fn pop(&mut self) -> Option<(f64, EventKind)> {
        self.heap.pop().map(|e| (f64::from_bits(e.time_bits), e.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_then_insertion_order() {
        let mut q = EventQueue::default();
        q.push(2.0, EventKind::Tick);
        q.push(1.0, EventKind::StepEnd(7));
        q.push(1.0, EventKind::StepEnd(3));
        q.push(0.5, EventKind::Landed(1));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (0.5, EventKind::Landed(1)),
                (1.0, EventKind::StepEnd(7)),
                (1.0, EventKind::StepEnd(3)),
                (2.0, EventKind::Tick)
            ]
        );
    }
}
