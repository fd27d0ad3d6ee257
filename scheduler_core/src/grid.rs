//! The length-bucket grid: stage boundaries are always bucket edges.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Most entries of each lookup table (16 KiB of `u32`).
const MAX_LOOKUP: usize = 4096;

/// Buckets `[edges[k], edges[k+1])` covering `[0, max_len)`; `edges[0] == 0`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GridEdges", into = "GridEdges")]
pub struct BucketGrid {
    edges: Vec<u32>,
    lookup: Lookup,
}

/// Tables that make [`BucketGrid::bucket_of`] O(1) and free of data-dependent branches where
/// edges are sparse (the policy asks once per decoded token; a binary search over the edges
/// showed up in profiles).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lookup {
    /// `coarse[k]`: the bucket holding length `k << shift`.
    shift: u32,
    coarse: Vec<u32>,
    /// Whether every span of `1 << shift` lengths at or past `fine.len()` holds at most one
    /// edge past its start, so one comparison finishes the lookup.
    is_one_step: bool,
    /// `fine[len]`: the bucket of `len`, for the short lengths where edges are dense.
    fine: Vec<u32>,
}

impl Lookup {
    fn new(edges: &[u32]) -> Self {
        let max_len = *edges.last().expect("a grid has edges");
        let mut shift = 0;
        while ((max_len - 1) >> shift) as usize >= MAX_LOOKUP {
            shift += 1;
        }
        let buckets_from = |starts: &mut dyn Iterator<Item = u32>| -> Vec<u32> {
            let mut bucket = 0;
            starts
                .map(|len| {
                    while edges[bucket + 1] <= len {
                        bucket += 1;
                    }
                    bucket as u32
                })
                .collect()
        };
        let coarse = buckets_from(&mut (0..=(max_len - 1) >> shift).map(|k| k << shift));
        // Lengths below the end of the last span with two edges past its start go to `fine`.
        let mut dense_end = 0;
        let inner = &edges[1..edges.len() - 1];
        for w in inner.windows(2) {
            let is_past_start = w[0] & ((1 << shift) - 1) != 0;
            if is_past_start && w[0] >> shift == w[1] >> shift {
                dense_end = ((w[1] >> shift) + 1) << shift;
            }
        }
        let dense_end = dense_end.min(max_len);
        let is_one_step = dense_end as usize <= MAX_LOOKUP;
        let fine = if is_one_step { buckets_from(&mut (0..dense_end)) } else { Vec::new() };
        Lookup { shift, coarse, is_one_step, fine }
    }
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
        let lookup = Lookup::new(&edges);
        Ok(BucketGrid { edges, lookup })
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
    #[inline(always)]
    pub fn bucket_of(&self, len: u32) -> Result<usize> {
        if len >= self.max_len() {
            return Err(self.too_long(len));
        }
        let lookup = &self.lookup;
        if let Some(&bucket) = lookup.fine.get(len as usize) {
            return Ok(bucket as usize);
        }
        let bucket = lookup.coarse[(len >> lookup.shift) as usize] as usize;
        if !lookup.is_one_step {
            return Ok(self.walk(bucket, len));
        }
        Ok(bucket + usize::from(self.edges[bucket + 1] <= len))
    }

    /// From `bucket` up over the edges at or below `len`.
    #[cold]
    fn walk(&self, mut bucket: usize, len: u32) -> usize {
        while self.edges[bucket + 1] <= len {
            bucket += 1;
        }
        bucket
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
        let dense_high: Vec<u32> = (0..5000).map(|k| if k == 0 { 0 } else { 120_000 + k }).chain([131_072]).collect();
        let grids = [
            BucketGrid::geometric(131_072, 128, 16).unwrap(),
            BucketGrid::geometric(131_072, 256, 1).unwrap(),
            BucketGrid::geometric(8192, 128, 16).unwrap(),
            BucketGrid::geometric(5000, 7, 64).unwrap(),
            BucketGrid::new(vec![0, 1, 2, 3, 9000, 9001, 20_000]).unwrap(),
            BucketGrid::new(vec![0, 64, 65, 128, 200_000]).unwrap(),
            BucketGrid::new(vec![0, 1]).unwrap(),
            // Dense edges far up: past what the direct table takes, lookups walk.
            BucketGrid::new(dense_high).unwrap(),
        ];
        assert!(!grids[7].lookup.is_one_step && grids[0].lookup.is_one_step);
        for g in &grids {
            for len in (0..g.max_len())
                .step_by(7)
                .chain(g.edges()[..g.num_buckets()].iter().flat_map(|&e| [e, e.saturating_sub(1)]))
            {
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
