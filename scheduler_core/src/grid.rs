//! The length-bucket grid: stage boundaries are always bucket edges.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Buckets `[edges[k], edges[k+1])` covering `[0, max_len)`; `edges[0] == 0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketGrid {
    edges: Vec<u32>,
}

impl BucketGrid {
    pub fn new(edges: Vec<u32>) -> Result<Self> {
        if edges.len() < 2 {
            return Err(CoreError::invalid("edges", format!("{edges:?}"), "need at least 2 edges (1 bucket)"));
        }
        if edges[0] != 0 {
            return Err(CoreError::invalid("edges", edges[0], "the first edge must be 0"));
        }
        if let Some(w) = edges.windows(2).find(|w| w[0] >= w[1]) {
            return Err(CoreError::invalid(
                "edges",
                format!("{} then {}", w[0], w[1]),
                "edges must be strictly increasing",
            ));
        }
        Ok(BucketGrid { edges })
    }

    /// `num_buckets` buckets whose widths grow geometrically from about `first_width` tokens to
    /// `max_len`: fine resolution where short requests crowd, coarse at 100K+.
    pub fn geometric(max_len: u32, num_buckets: usize, first_width: u32) -> Result<Self> {
        if num_buckets == 0 {
            return Err(CoreError::invalid("num_buckets", 0, "must be >= 1"));
        }
        if max_len < num_buckets as u32 {
            return Err(CoreError::invalid("max_len", max_len, format!("must be >= num_buckets ({num_buckets})")));
        }
        let first = f64::from(first_width.clamp(1, max_len));
        let ratio =
            if num_buckets > 1 { (f64::from(max_len) / first).powf(1.0 / (num_buckets - 1) as f64) } else { 1.0 };
        let mut edges = Vec::with_capacity(num_buckets + 1);
        edges.push(0u32);
        for k in 1..num_buckets {
            let ideal = (first * ratio.powi(k as i32 - 1)).round() as u32;
            let prev = *edges.last().unwrap();
            // Leave room for the remaining edges below max_len.
            let ceiling = max_len - (num_buckets - k) as u32;
            edges.push(ideal.max(prev + 1).min(ceiling));
        }
        edges.push(max_len);
        BucketGrid::new(edges)
    }

    pub fn edges(&self) -> &[u32] {
        &self.edges
    }

    pub fn num_buckets(&self) -> usize {
        self.edges.len() - 1
    }

    pub fn max_len(&self) -> u32 {
        *self.edges.last().unwrap()
    }

    /// Bucket holding `len`, or an error for a length at or beyond `max_len`.
    pub fn bucket_of(&self, len: u32) -> Result<usize> {
        if len >= self.max_len() {
            return Err(CoreError::invalid("length", len, format!("must be < max_len {}", self.max_len())));
        }
        Ok(self.edges.partition_point(|&e| e <= len) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_grid_is_valid_and_exact_size() {
        for (max_len, b) in [(131_072, 256), (8192, 128), (64, 64), (100, 1)] {
            let g = BucketGrid::geometric(max_len, b, 16).unwrap();
            assert_eq!(g.num_buckets(), b);
            assert_eq!(g.max_len(), max_len);
        }
    }

    #[test]
    fn bucket_of_finds_the_half_open_bucket() {
        let g = BucketGrid::new(vec![0, 10, 100, 1000]).unwrap();
        assert_eq!(g.bucket_of(0).unwrap(), 0);
        assert_eq!(g.bucket_of(9).unwrap(), 0);
        assert_eq!(g.bucket_of(10).unwrap(), 1);
        assert_eq!(g.bucket_of(999).unwrap(), 2);
        assert!(g.bucket_of(1000).is_err());
    }

    #[test]
    fn bad_grids_are_rejected() {
        assert!(BucketGrid::new(vec![0]).is_err());
        assert!(BucketGrid::new(vec![1, 10]).is_err());
        assert!(BucketGrid::new(vec![0, 10, 10]).is_err());
        assert!(BucketGrid::geometric(10, 0, 1).is_err());
    }
}
