//! The simulator's future: events keyed by (time, insertion order), so equal times pop in the
//! order they were scheduled and a run never depends on anything but its inputs.
//!
//! Times are finite and non-negative, so their IEEE bits order like the numbers: a key is a
//! time's bits then an insertion number, compared as integers. Step ends, nearly all events, sit
//! in a tournament tree with one leaf per instance (an instance has at most one step in
//! progress): a node holds the earlier of its children, so the root is the next step end. A
//! leaf's path is fixed, so an update reads the siblings independently and selects without
//! branching (a heap would chase its children). A popped step end stays in its leaf until that
//! instance's next step replaces it, one replay per step; any other step end pushed, or the next
//! pop, empties the leaf first. The few other events (ticks, migrations) wait in a heap.

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

/// The key of an empty leaf: after every real key (finite times have smaller bits).
const NONE: u128 = u128::MAX;

/// An event's place in the order: its time's bits, then its insertion number.
fn key(time_bits: u64, seq: u64) -> u128 {
    (u128::from(time_bits) << 64) | u128::from(seq)
}

fn time_of(key: u128) -> f64 {
    f64::from_bits((key >> 64) as u64)
}

/// A node of the tree: the earliest step end below it. A key is kept as its time bits and its
/// insertion number, so selects are between machine words.
#[derive(Copy, Clone, Debug)]
struct Node {
    time_bits: u64,
    seq: u64,
    slot: u32,
}

impl Node {
    fn key(&self) -> u128 {
        key(self.time_bits, self.seq)
    }
}

/// A winner tree over instance slots: node `k` holds the earlier of nodes `2k` and `2k + 1`,
/// leaves sit at `size..2 * size`, the root at 1.
#[derive(Debug)]
struct StepTree {
    size: usize,
    nodes: Vec<Node>,
}

impl Default for StepTree {
    fn default() -> Self {
        StepTree::with_slots(1)
    }
}

impl StepTree {
    fn with_slots(num_slots: usize) -> Self {
        let size = num_slots.max(1).next_power_of_two();
        let node = |k: usize| Node { time_bits: u64::MAX, seq: u64::MAX, slot: k.saturating_sub(size) as u32 };
        StepTree { size, nodes: (0..2 * size).map(node).collect() }
    }

    fn root(&self) -> (u128, u32) {
        (self.nodes[1].key(), self.nodes[1].slot)
    }

    /// Puts `slot`'s step end at `key` (`NONE`: none) and replays its path to the root.
    fn set(&mut self, slot: u32, key: u128) {
        if slot as usize >= self.size {
            self.grow(slot as usize + 1);
        }
        let mut k = self.size + slot as usize;
        let mut node = Node { time_bits: (key >> 64) as u64, seq: key as u64, slot };
        self.nodes[k] = node;
        while k > 1 {
            let other = self.nodes[k ^ 1];
            let is_other_first =
                (other.time_bits < node.time_bits) | ((other.time_bits == node.time_bits) & (other.seq < node.seq));
            // The outcome is a coin flip: selects, not branches.
            node = Node {
                time_bits: select_unpredictable(is_other_first, other.time_bits, node.time_bits),
                seq: select_unpredictable(is_other_first, other.seq, node.seq),
                slot: select_unpredictable(is_other_first, other.slot, node.slot),
            };
            k /= 2;
            self.nodes[k] = node;
        }
    }

    #[cold]
    fn grow(&mut self, num_slots: usize) {
        let old = std::mem::replace(self, StepTree::with_slots(num_slots));
        for node in &old.nodes[old.size..] {
            if node.key() != NONE {
                self.set(node.slot, node.key());
            }
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OtherKind {
    BulkCopied(u32),
    Landed(u32),
    Tick,
}

#[derive(Debug, Default)]
pub(super) struct EventQueue {
    steps: StepTree,
    /// Other events by key.
    others: BinaryHeap<Reverse<(u128, OtherKind)>>,
    next_seq: u64,
    /// The root step end was popped but is still in its leaf.
    popped_slot: Option<u32>,
}

impl EventQueue {
    /// A queue for instances `0..num_slots` (it grows if a step end names another).
    pub fn with_slots(num_slots: usize) -> Self {
        EventQueue { steps: StepTree::with_slots(num_slots), ..EventQueue::default() }
    }

    pub fn push(&mut self, time: f64, kind: EventKind) {
        debug_assert!(time.is_finite() && time >= 0.0 && time.is_sign_positive(), "event time {time}");
        let key = key(time.to_bits(), self.next_seq);
        self.next_seq += 1;
        let other = match kind {
            EventKind::StepEnd(slot) => {
                if self.popped_slot == Some(slot) {
                    self.popped_slot = None;
                } else {
                    self.settle();
                    debug_assert!(
                        self.steps.nodes.get(self.steps.size + slot as usize).is_none_or(|n| n.key() == NONE),
                        "two steps in progress on slot {slot}"
                    );
                }
                return self.steps.set(slot, key);
            }
            EventKind::BulkCopied(f) => OtherKind::BulkCopied(f),
            EventKind::Landed(f) => OtherKind::Landed(f),
            EventKind::Tick => OtherKind::Tick,
        };
        self.others.push(Reverse((key, other)));
    }

    /// Empties the leaf of a popped step end.
    fn settle(&mut self) {
        if let Some(slot) = self.popped_slot.take() {
            self.steps.set(slot, NONE);
        }
    }

    /// The next event's key and whether it is the root step end (rather than the heap's top).
    fn next(&mut self) -> (u128, bool) {
        self.settle();
        let step = self.steps.root().0;
        let other = self.others.peek().map_or(NONE, |o| o.0 .0);
        (step.min(other), step < other)
    }

    #[cfg(test)]
    pub fn peek_time(&mut self) -> Option<f64> {
        let (key, _) = self.next();
        (key != NONE).then(|| time_of(key))
    }

    /// Pops the next event unless it comes after `time` (then, or when there is none, `None`).
    pub fn pop_unless_after(&mut self, time: f64) -> Option<(f64, EventKind)> {
        let (key, is_step) = self.next();
        if key == NONE || time < time_of(key) {
            return None;
        }
        if is_step {
            let slot = self.steps.root().1;
            self.popped_slot = Some(slot);
            return Some((time_of(key), EventKind::StepEnd(slot)));
        }
        let Reverse((_, kind)) = self.others.pop()?;
        let kind = match kind {
            OtherKind::BulkCopied(f) => EventKind::BulkCopied(f),
            OtherKind::Landed(f) => EventKind::Landed(f),
            OtherKind::Tick => EventKind::Tick,
        };
        Some((time_of(key), kind))
    }

    #[cfg(test)]
    pub fn pop(&mut self) -> Option<(f64, EventKind)> {
        self.pop_unless_after(f64::INFINITY)
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
                assert_eq!(q.peek_time(), reference.last().map(|e| e.0));
                // An arrival at `limit` goes first when it is strictly earlier.
                let limit = now + f64::from(rng.range_u32(0, 4)) * 0.25;
                if reference.last().is_some_and(|e| limit < e.0) {
                    assert_eq!(q.pop_unless_after(limit), None);
                    continue;
                }
                let expected = reference.pop().map(|(t, _, k)| (t, k));
                assert_eq!(q.pop_unless_after(limit), expected);
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
