//! Migrations between their decision and their landing, and the two gates the live scheduler
//! puts before them: a token bucket for optional moves and a cap on concurrent transfers.

use std::collections::VecDeque;

use crate::policy::Migration;

/// A started migration.
#[derive(Copy, Clone, Debug)]
pub(super) struct Flight {
    pub migration: Migration,
    /// Blocks held on the target since the start (topped up at landing).
    pub reserved_blocks: u32,
    /// Tokens the bulk copy moved while the request kept decoding.
    pub copied_tokens: u32,
}

/// The scheduler's token bucket (cascadeinfer.scheduler.ratelimit.TokenBucket): `rate` a second
/// on average, bursts of up to `max(rate, 1)`, full at the start.
#[derive(Copy, Clone, Debug)]
pub(super) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: f64,
}

impl TokenBucket {
    pub fn new(rate: f64) -> Self {
        let burst = rate.max(1.0);
        TokenBucket { rate, burst, tokens: burst, at: 0.0 }
    }

    pub fn try_take(&mut self, now: f64) -> bool {
        self.tokens = self.burst.min(self.tokens + (now - self.at) * self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }
}

#[derive(Debug)]
pub(super) struct Flights {
    slots: Vec<Option<Flight>>,
    free: Vec<u32>,
    pub num_active: u32,
    /// Decided migrations waiting for a transfer slot, in decision order.
    pub pending: VecDeque<Migration>,
    /// `None`: optional moves are not rate-limited.
    pub bucket: Option<TokenBucket>,
}

impl Flights {
    pub fn new(optional_rate: Option<f64>) -> Self {
        Flights {
            slots: Vec::new(),
            free: Vec::new(),
            num_active: 0,
            pending: VecDeque::new(),
            bucket: optional_rate.map(TokenBucket::new),
        }
    }

    pub fn start(&mut self, flight: Flight) -> u32 {
        self.num_active += 1;
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(flight);
                id
            }
            None => {
                self.slots.push(Some(flight));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn get(&self, id: u32) -> Flight {
        self.slots[id as usize].expect("live flight")
    }

    pub fn end(&mut self, id: u32) -> Flight {
        let flight = self.slots[id as usize].take().expect("live flight");
        self.free.push(id);
        self.num_active -= 1;
        flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(2.0);
        assert!(b.try_take(0.0) && b.try_take(0.0) && !b.try_take(0.0));
        assert!(!b.try_take(0.25), "half a token after 0.25 s");
        assert!(b.try_take(0.5));
        let mut slow = TokenBucket::new(0.5);
        assert!(slow.try_take(0.0) && !slow.try_take(1.0) && slow.try_take(2.0));
    }
}
