//! The length-bucket grid: stage boundaries are always bucket edges.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Most entries of the lookup table that makes [`BucketGrid::bucket_of`] O(1).
const MAX_LOOKUP: usize = 4096;

/// Buckets `[edges[k], edges[k+1])` covering `[0, max_len)`; `edges[0] == 0`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GridEdges", into = "GridEdges")]
pub struct BucketGrid {
    edges: Vec<u32>,
    /// `lookup[k]`: the bucket holding length `k << shift`. The bucket of any `len` is found
    /// from `lookup[len >> shift]` by stepping over the few edges inside that span (the policy
    /// asks once per decoded token, so a binary search over the edges showed up in profiles).
    lookup: Vec<u32>,
    shift: u32,
}

/// The serialized form: the edges only.
#[derive(Serialize, Deserialize)]
struct GridEdges {
    edges: Vec<u32>,
}

impl TryFrom<GridEdges> for BucketGrid {
    type Error = CoreError;

    fn try_from(g: GridEdges) -> Result<Self> {
        BucketGrid::new(g.edges)
    }
}

impl From<BucketGrid> for GridEdges {
    fn from(g: BucketGrid) -> Self {
        GridEdges { edges: g.edges }
    }
}

impl fmt::Debug for BucketGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketGrid").field("edges", &self.edges).finish()
    }
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
        let max_len = *edges.last().expect("checked above");
        let mut shift = 0;
        while ((max_len - 1) >> shift) as usize >= MAX_LOOKUP {
            shift += 1;
        }
        let mut lookup = Vec::with_capacity(((max_len - 1) >> shift) as usize + 1);
        let mut bucket = 0;
        for k in 0..=(max_len - 1) >> shift {
            while edges[bucket + 1] <= k << shift {
                bucket += 1;
            }
            lookup.push(bucket as u32);
        }
        Ok(BucketGrid { edges, lookup, shift })
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

    #[cold]
    fn too_long(&self, len: u32) -> CoreError {
        CoreError::invalid("length", len, format!("must be < max_len {}", self.max_len()))
    }

    /// Bucket holding `len`, or an error for a length at or beyond `max_len`.
    #[inline]
    pub fn bucket_of(&self, len: u32) -> Result<usize> {
        if len >= self.max_len() {
            return Err(self.too_long(len));
        }
        let mut bucket = self.lookup[(len >> self.shift) as usize] as usize;
        while self.edges[bucket + 1] <= len {
            bucket += 1;
        }
        Ok(bucket)
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
    fn bucket_of_agrees_with_a_search_of_the_edges() {
        let grids = [
            BucketGrid::geometric(131_072, 128, 16).unwrap(),
            BucketGrid::geometric(131_072, 256, 1).unwrap(),
            BucketGrid::geometric(5000, 7, 64).unwrap(),
            BucketGrid::new(vec![0, 1, 2, 3, 9000, 9001, 20_000]).unwrap(),
            BucketGrid::new(vec![0, 1]).unwrap(),
        ];
        for g in &grids {
            for len in (0..g.max_len()).step_by(7).chain(g.edges()[..g.num_buckets()].iter().flat_map(|&e| [e, e.saturating_sub(1)])) {
                assert_eq!(g.bucket_of(len).unwrap(), g.edges().partition_point(|&e| e <= len) - 1, "{len} in {g:?}");
            }
        }
    }

    #[test]
    fn serializes_as_its_edges() {
        let g = BucketGrid::new(vec![0, 10, 100]).unwrap();
        let text = serde_json::to_string(&g).unwrap();
        assert_eq!(text, r#"{"edges":[0,10,100]}"#);
        assert_eq!(serde_json::from_str::<BucketGrid>(&text).unwrap(), g);
        assert!(serde_json::from_str::<BucketGrid>(r#"{"edges":[0,10,10]}"#).is_err());
    }

    #[test]
    fn bad_grids_are_rejected() {
        assert!(BucketGrid::new(vec![0]).is_err());
        assert!(BucketGrid::new(vec![1, 10]).is_err());
        assert!(BucketGrid::new(vec![0, 10, 10]).is_err());
        assert!(BucketGrid::geometric(10, 0, 1).is_err());
    }
}
