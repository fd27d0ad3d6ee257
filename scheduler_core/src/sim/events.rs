//! The simulator's future: events keyed by (time, insertion order), so equal times pop in the
//! order they were scheduled and a run never depends on anything but its inputs.
//!
//! Times are finite and non-negative, so their IEEE bits order like the numbers and keys compare
//! as integers. Step ends, nearly all events, sit in a tournament tree with one leaf per instance
//! (an instance has at most one step in progress): a node holds the earlier of its children, so
//! the root is the next step end. Its path from a leaf is fixed, so an update reads the siblings
//! independently and compares without branching; a heap would chase its children. A popped step
//! end stays in its leaf until that instance's next step replaces it (one replay per step) or
//! anything else touches the queue. The few other events (ticks, migrations) wait in a heap.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::select_unpredictable;

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

/// The bits of a time no event has: above every finite time's.
const NONE: u64 = u64::MAX;

/// A winner tree over instance slots: node `k` holds the earlier of nodes `2k` and `2k + 1`,
/// leaves sit at `size..2 * size`, the root at 1. Times are compared first; the insertion
/// numbers of the leaves decide exact ties.
#[derive(Debug)]
struct StepTree {
    size: usize,
    time_bits: Vec<u64>,
    slot: Vec<u32>,
    /// Per slot: the insertion number of its step end.
    seq: Vec<u64>,
}

impl Default for StepTree {
    fn default() -> Self {
        StepTree::with_slots(1)
    }
}

impl StepTree {
    fn with_slots(num_slots: usize) -> Self {
        let size = num_slots.max(1).next_power_of_two();
        StepTree {
            size,
            time_bits: vec![NONE; 2 * size],
            slot: (0..2 * size).map(|k| k.saturating_sub(size) as u32).collect(),
            seq: vec![u64::MAX; size],
        }
    }

    fn root(&self) -> (u64, u32) {
        (self.time_bits[1], self.slot[1])
    }

    fn seq_of(&self, slot: u32) -> u64 {
        self.seq[slot as usize]
    }

    /// Puts `slot`'s step end at `time_bits` (`NONE`: none) and replays its path.
    fn set(&mut self, slot: u32, time_bits: u64, seq: u64) {
        if slot as usize >= self.size {
            self.grow(slot as usize + 1);
        }
        self.seq[slot as usize] = seq;
        let mut k = self.size + slot as usize;
        self.time_bits[k] = time_bits;
        let (mut t, mut s) = (time_bits, slot);
        while k > 1 {
            let (other_t, other_s) = (self.time_bits[k ^ 1], self.slot[k ^ 1]);
            let is_other_first = if other_t == t && t != NONE {
                self.seq[other_s as usize] < self.seq[s as usize]
            } else {
                other_t < t
            };
            t = select_unpredictable(is_other_first, other_t, t);
            s = select_unpredictable(is_other_first, other_s, s);
            k /= 2;
            self.time_bits[k] = t;
            self.slot[k] = s;
        }
    }

    #[cold]
    fn grow(&mut self, num_slots: usize) {
        let old = std::mem::replace(self, StepTree::with_slots(num_slots));
        for slot in 0..old.size as u32 {
            let t = old.time_bits[old.size + slot as usize];
            if t != NONE {
                self.set(slot, t, old.seq_of(slot));
            }
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct EventQueue {
    steps: StepTree,
    /// Other events by (time bits, insertion number).
    others: BinaryHeap<Reverse<(u64, u64, OtherKind)>>,
    next_seq: u64,
    /// The root step end was popped but is still in its leaf.
    popped_slot: Option<u32>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OtherKind {
    BulkCopied(u32),
    Landed(u32),
    Tick,
}

impl EventQueue {
    /// A queue for instances `0..num_slots` (it grows if a step end names another).
    pub fn with_slots(num_slots: usize) -> Self {
        EventQueue { steps: StepTree::with_slots(num_slots), ..EventQueue::default() }
    }

    pub fn push(&mut self, time: f64, kind: EventKind) {
        debug_assert!(time.is_finite() && time >= 0.0 && time.is_sign_positive(), "event time {time}");
        let (time_bits, seq) = (time.to_bits(), self.next_seq);
        self.next_seq += 1;
        let other = match kind {
            EventKind::StepEnd(slot) => {
                if self.popped_slot == Some(slot) {
                    self.popped_slot = None;
                } else {
                    self.settle();
                    debug_assert!(
                        self.steps.time_bits.get(self.steps.size + slot as usize).is_none_or(|&t| t == NONE),
                        "two steps in progress on slot {slot}"
                    );
                }
                return self.steps.set(slot, time_bits, seq);
            }
            EventKind::BulkCopied(f) => OtherKind::BulkCopied(f),
            EventKind::Landed(f) => OtherKind::Landed(f),
            EventKind::Tick => OtherKind::Tick,
        };
        self.others.push(Reverse((time_bits, seq, other)));
    }

    /// Empties the leaf of a popped step end.
    fn settle(&mut self) {
        if let Some(slot) = self.popped_slot.take() {
            self.steps.set(slot, NONE, u64::MAX);
        }
    }

    /// Whether the next event is the root step end (rather than the heap's top), and its time.
    fn next(&mut self) -> Option<(bool, u64)> {
        self.settle();
        let (step_t, step_slot) = self.steps.root();
        let Some(&Reverse((other_t, other_seq, _))) = self.others.peek() else {
            return (step_t != NONE).then_some((true, step_t));
        };
        let is_step = (step_t, self.steps.seq_of(step_slot)) < (other_t, other_seq);
        Some((is_step, if is_step { step_t } else { other_t }))
    }

    pub fn peek_time(&mut self) -> Option<f64> {
        self.next().map(|(_, t)| f64::from_bits(t))
    }

    pub fn pop(&mut self) -> Option<(f64, EventKind)> {
        let (is_step, time_bits) = self.next()?;
        if is_step {
            let slot = self.steps.root().1;
            self.popped_slot = Some(slot);
            return Some((f64::from_bits(time_bits), EventKind::StepEnd(slot)));
        }
        let Reverse((_, _, kind)) = self.others.pop()?;
        let kind = match kind {
            OtherKind::BulkCopied(f) => EventKind::BulkCopied(f),
            OtherKind::Landed(f) => EventKind::Landed(f),
            OtherKind::Tick => EventKind::Tick,
        };
        Some((f64::from_bits(time_bits), kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_queue_and_one_without_step_ends() {
        let mut q = EventQueue::default();
        assert_eq!((q.peek_time(), q.pop()), (None, None));
        q.push(1.0, EventKind::Tick);
        assert_eq!(q.pop(), Some((1.0, EventKind::Tick)));
        assert_eq!(q.pop(), None);
    }

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

    /// The order a plain sorted list of (time, insertion order) gives, over a simulation-like
    /// mix: at most one step end per slot, equal times, pops between pushes.
    #[test]
    fn pops_in_the_order_of_a_sorted_list() {
        let mut rng = crate::rng::Rng::new(3);
        let mut q = EventQueue::with_slots(5);
        let mut reference: Vec<(f64, u64, EventKind)> = Vec::new();
        let mut busy = [false; 9];
        let (mut seq, mut now) = (0u64, 0.0);
        for _ in 0..20_000 {
            if rng.uniform() < 0.55 {
                // Coarse times so ties happen; slots past the initial 5 grow the tree.
                let time = now + f64::from(rng.range_u32(0, 4)) * 0.25;
                let kind = match rng.range_u32(0, 3) {
                    0 => EventKind::Tick,
                    1 => EventKind::Landed(rng.range_u32(0, 50)),
                    _ => {
                        let slot = rng.range_u32(0, 8);
                        if busy[slot as usize] {
                            continue;
                        }
                        busy[slot as usize] = true;
                        EventKind::StepEnd(slot)
                    }
                };
                q.push(time, kind);
                reference.push((time, seq, kind));
                seq += 1;
            } else {
                reference.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
                let expected = reference.pop().map(|(t, _, k)| (t, k));
                assert_eq!(q.peek_time(), expected.map(|e| e.0));
                assert_eq!(q.pop(), expected);
                if let Some((t, kind)) = expected {
                    now = t;
                    if let EventKind::StepEnd(slot) = kind {
                        busy[slot as usize] = false;
                    }
                }
            }
        }
    }
}
