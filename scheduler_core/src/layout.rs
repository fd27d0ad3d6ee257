//! The runtime stage layout: concrete instances assigned to length ranges.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::ids::InstanceId;
use crate::partition::StagePlan;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRange {
    pub min_len: u32,
    /// Exclusive; a request whose context reaches it belongs to the next stage.
    pub max_len: u32,
    pub instances: Vec<InstanceId>,
}

/// Contiguous stages covering `[0, max_len)`, each with at least one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLayout {
    stages: Vec<StageRange>,
    /// `stage_of[instance.index()]`, `None` for ids not in the layout.
    stage_of: Vec<Option<usize>>,
}

impl StageLayout {
    pub fn new(stages: Vec<StageRange>) -> Result<Self> {
        if stages.is_empty() {
            return Err(CoreError::invalid("stages", "[]", "need at least one stage"));
        }
        if stages[0].min_len != 0 {
            return Err(CoreError::invalid("stages[0].min_len", stages[0].min_len, "must be 0"));
        }
        let mut stage_of: Vec<Option<usize>> = Vec::new();
        for (k, s) in stages.iter().enumerate() {
            if s.min_len >= s.max_len {
                return Err(CoreError::invalid(
                    "stage range",
                    format!("[{}, {})", s.min_len, s.max_len),
                    "must be non-empty",
                ));
            }
            if k > 0 && stages[k - 1].max_len != s.min_len {
                return Err(CoreError::invalid(
                    "stage range",
                    format!("[{}, {})", s.min_len, s.max_len),
                    "stages must be contiguous",
                ));
            }
            if s.instances.is_empty() {
                return Err(CoreError::invalid(
                    "stage instances",
                    format!("stage {k}"),
                    "every stage needs an instance",
                ));
            }
            for &inst in &s.instances {
                if stage_of.len() <= inst.index() {
                    stage_of.resize(inst.index() + 1, None);
                }
                if stage_of[inst.index()].replace(k).is_some() {
                    return Err(CoreError::invalid("instance", inst.0, "appears in two stages"));
                }
            }
        }
        Ok(StageLayout { stages, stage_of })
    }

    /// Assigns `instances` to the plan's stages in order (the plan says how many each gets).
    pub fn from_plan(plan: &StagePlan, instances: &[InstanceId]) -> Result<Self> {
        let wanted: u32 = plan.stages.iter().map(|s| s.num_instances).sum();
        if wanted as usize != instances.len() {
            return Err(CoreError::invalid("instances", instances.len(), format!("the plan needs exactly {wanted}")));
        }
        let mut next = instances.iter().copied();
        let stages = plan
            .stages
            .iter()
            .map(|s| StageRange {
                min_len: s.min_len,
                max_len: s.max_len,
                instances: next.by_ref().take(s.num_instances as usize).collect(),
            })
            .collect();
        StageLayout::new(stages)
    }

    /// One stage over `[0, max_len)` holding every instance (what the baselines see).
    pub fn single(max_len: u32, instances: &[InstanceId]) -> Result<Self> {
        StageLayout::new(vec![StageRange { min_len: 0, max_len, instances: instances.to_vec() }])
    }

    pub fn stages(&self) -> &[StageRange] {
        &self.stages
    }

    pub fn max_len(&self) -> u32 {
        self.stages.last().unwrap().max_len
    }

    /// The stage serving context length `len`; lengths past the end belong to the last stage.
    pub fn stage_of_len(&self, len: u32) -> usize {
        self.stages.partition_point(|s| s.max_len <= len).min(self.stages.len() - 1)
    }

    #[inline]
    pub fn stage_of_instance(&self, inst: InstanceId) -> Option<usize> {
        self.stage_of.get(inst.index()).copied().flatten()
    }

    pub fn instances(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.stages.iter().flat_map(|s| s.instances.iter().copied())
    }

    pub fn num_instances(&self) -> usize {
        self.stages.iter().map(|s| s.instances.len()).sum()
    }

    /// Same instances, new ranges and counts; each instance keeps its place in length order, so
    /// as few as possible change stage.
    pub fn reassign(&self, plan: &StagePlan) -> Result<Self> {
        let ordered: Vec<InstanceId> = self.instances().collect();
        StageLayout::from_plan(plan, &ordered)
    }

    /// Adds an instance to stage `stage`.
    pub fn add_instance(&mut self, inst: InstanceId, stage: usize) -> Result<()> {
        if self.stage_of_instance(inst).is_some() {
            return Err(CoreError::invalid("instance", inst.0, "already in the layout"));
        }
        let mut stages = self.stages.clone();
        stages[stage].instances.push(inst);
        *self = StageLayout::new(stages)?;
        Ok(())
    }

    /// Splits stage `stage` at `boundary` (strictly inside its range): a new instance takes the
    /// lower part alone, the stage's instances keep the upper part, where the requests that
    /// already grew past the boundary are.
    pub fn split_for(&mut self, inst: InstanceId, stage: usize, boundary: u32) -> Result<()> {
        if self.stage_of_instance(inst).is_some() {
            return Err(CoreError::invalid("instance", inst.0, "already in the layout"));
        }
        let range = self.stages.get(stage).ok_or(CoreError::Unknown { kind: "stage", id: stage as u64 })?;
        if !(range.min_len < boundary && boundary < range.max_len) {
            return Err(CoreError::invalid("boundary", boundary, format!("must be inside stage {stage}")));
        }
        let lower = StageRange { min_len: range.min_len, max_len: boundary, instances: vec![inst] };
        let mut stages = self.stages.clone();
        stages[stage].min_len = boundary;
        stages.insert(stage, lower);
        *self = StageLayout::new(stages)?;
        Ok(())
    }

    /// Moves an instance to stage `stage`; its own stage must keep at least one other.
    pub fn move_instance(&mut self, inst: InstanceId, stage: usize) -> Result<()> {
        let from =
            self.stage_of_instance(inst).ok_or(CoreError::Unknown { kind: "instance", id: u64::from(inst.0) })?;
        if stage >= self.stages.len() || self.stages[from].instances.len() < 2 {
            return Err(CoreError::invalid("instance", inst.0, format!("cannot move from stage {from} to {stage}")));
        }
        let mut stages = self.stages.clone();
        stages[from].instances.retain(|&i| i != inst);
        stages[stage].instances.push(inst);
        *self = StageLayout::new(stages)?;
        Ok(())
    }

    /// Removes an instance; a stage left empty takes one from its most populous neighbour, or
    /// merges into its neighbour when no neighbour can spare one.
    pub fn remove_instance(&mut self, inst: InstanceId) -> Result<()> {
        let k = self.stage_of_instance(inst).ok_or(CoreError::Unknown { kind: "instance", id: u64::from(inst.0) })?;
        if self.num_instances() == 1 {
            return Err(CoreError::invalid("instance", inst.0, "cannot remove the last instance"));
        }
        let mut stages = self.stages.clone();
        stages[k].instances.retain(|&i| i != inst);
        if stages[k].instances.is_empty() {
            let donor = [k.checked_sub(1), (k + 1 < stages.len()).then_some(k + 1)]
                .into_iter()
                .flatten()
                .max_by_key(|&d| stages[d].instances.len())
                .expect("more than one stage when a stage empties");
            if stages[donor].instances.len() > 1 {
                let moved = stages[donor].instances.pop().unwrap();
                stages[k].instances.push(moved);
            } else {
                // Merge stage k into the donor.
                let removed = stages.remove(k);
                let d = if donor > k { donor - 1 } else { donor };
                stages[d].min_len = stages[d].min_len.min(removed.min_len);
                stages[d].max_len = stages[d].max_len.max(removed.max_len);
            }
        }
        *self = StageLayout::new(stages)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<InstanceId> {
        v.iter().map(|&i| InstanceId(i)).collect()
    }

    fn three_stages() -> StageLayout {
        StageLayout::new(vec![
            StageRange { min_len: 0, max_len: 100, instances: ids(&[0, 1]) },
            StageRange { min_len: 100, max_len: 1000, instances: ids(&[2]) },
            StageRange { min_len: 1000, max_len: 5000, instances: ids(&[3, 4]) },
        ])
        .unwrap()
    }

    #[test]
    fn lookups() {
        let l = three_stages();
        assert_eq!(l.stage_of_len(0), 0);
        assert_eq!(l.stage_of_len(99), 0);
        assert_eq!(l.stage_of_len(100), 1);
        assert_eq!(l.stage_of_len(4999), 2);
        assert_eq!(l.stage_of_len(10_000), 2);
        assert_eq!(l.stage_of_instance(InstanceId(3)), Some(2));
        assert_eq!(l.stage_of_instance(InstanceId(9)), None);
    }

    #[test]
    fn invalid_layouts_are_rejected() {
        let gap = vec![
            StageRange { min_len: 0, max_len: 100, instances: ids(&[0]) },
            StageRange { min_len: 200, max_len: 300, instances: ids(&[1]) },
        ];
        assert!(StageLayout::new(gap).is_err());
        let dup = vec![
            StageRange { min_len: 0, max_len: 100, instances: ids(&[0]) },
            StageRange { min_len: 100, max_len: 300, instances: ids(&[0]) },
        ];
        assert!(StageLayout::new(dup).is_err());
    }

    #[test]
    fn removing_a_stage_s_last_instance_refills_it_from_a_neighbour() {
        let mut l = three_stages();
        l.remove_instance(InstanceId(2)).unwrap();
        assert_eq!(l.stages().len(), 3);
        assert_eq!(l.stages()[1].instances.len(), 1);
        assert_eq!(l.num_instances(), 4);
        // Now every stage is thin; removing more merges.
        l.remove_instance(InstanceId(0)).unwrap();
        l.remove_instance(InstanceId(1)).unwrap();
        assert_eq!(l.num_instances(), 2);
        assert_eq!(l.stages()[0].min_len, 0);
        assert_eq!(l.max_len(), 5000);
    }
}
