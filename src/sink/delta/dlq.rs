//! The `_dlq` table: dead letters (events no sink can hold) beside the Bronze tables.
//!
//! Guarantees: each dead letter is written exactly once per (stream, position): the commit carries
//! `txn` versions under the app ids `{name}:dlq:{stream}`, and letters at or below what the table
//! already holds for their stream are skipped, so a replayed batch writes nothing again.

use std::collections::BTreeMap;

use super::commit::commit_files;
use super::txn::{committed_in, txn_actions};
use super::{DeltaSink, DeltaSinkError, WriteOutcome, bronze};
use crate::dead_letter::DeadLetter;
use crate::event::{Position, StreamId};

/// Name of the dead-letter table under the sink's root.
pub const DLQ_TABLE: &str = "_dlq";

impl DeltaSink {
    /// One attempt to append `letters` to `_dlq`; the letters already there are skipped.
    pub(super) async fn write_dead_letters_once(
        &mut self,
        letters: &[DeadLetter],
    ) -> Result<WriteOutcome, DeltaSinkError> {
        let name = format!("{}:dlq", self.name);
        let table = self.table(DLQ_TABLE, &bronze::dlq_schema()).await?;
        let mut committed: BTreeMap<StreamId, Option<Position>> = BTreeMap::new();
        for d in letters {
            let stream = d.position.stream();
            if let std::collections::btree_map::Entry::Vacant(slot) = committed.entry(stream) {
                let c = committed_in(table, &name, DLQ_TABLE, slot.key()).await?;
                slot.insert(c);
            }
        }
        let fresh: Vec<&DeadLetter> = letters
            .iter()
            .filter(|d| match committed.get(&d.position.stream()) {
                Some(Some(c)) => d.position > *c,
                _ => true,
            })
            .collect();
        if fresh.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let batch = bronze::dead_letters_to_batch(&fresh).map_err(|e| DeltaSinkError::Arrow {
            table: DLQ_TABLE.to_owned(),
            source: e,
        })?;
        let mut highest: BTreeMap<StreamId, &Position> = BTreeMap::new();
        for d in &fresh {
            let e = highest.entry(d.position.stream()).or_insert(&d.position);
            if d.position > **e {
                *e = &d.position;
            }
        }
        let txns = highest
            .values()
            .flat_map(|p| txn_actions(&name, p))
            .collect();
        let rows = batch.num_rows();
        let version = commit_files(table, DLQ_TABLE, &[batch], txns).await?;
        Ok(WriteOutcome {
            rows,
            version: Some(version),
            rejected: Vec::new(),
        })
    }
}
