//! Stream positions as Delta `txn` actions: what a commit writes and what a table holds.
//!
//! Guarantees: [`txn_actions`] and [`committed_in`] use the same app ids, so what `committed_in`
//! reads back is the position the last commit for that stream recorded (the highest: commits only
//! move a stream forward). A position is two integers, so it takes two app ids in the same
//! commit: `{name}:{stream}` holds the major part (`…:postgres` = commit LSN,
//! `…:kafka:{topic}:{partition}` = offset), `{name}:{stream}:ordinal` the minor part. A table
//! whose commits recorded no minor part (Kafka streams, before positions were flat) reads as the
//! end of that major position, which is what those commits meant.

use deltalake::DeltaTable;
use deltalake::kernel::Transaction;

use super::DeltaSinkError;
use crate::event::{Position, StreamId};

/// The txn app ids of one stream's (major, minor) parts.
fn app_ids(name: &str, stream: &StreamId) -> (String, String) {
    let major = format!("{name}:{stream}");
    let minor = format!("{major}:ordinal");
    (major, minor)
}

/// The `txn` actions recording `pos` as the highest position of its stream.
pub(super) fn txn_actions(name: &str, pos: &Position) -> Vec<Transaction> {
    let (major_id, minor_id) = app_ids(name, &pos.stream);
    vec![
        Transaction::new(major_id, pos.major),
        Transaction::new(minor_id, pos.minor),
    ]
}

/// The highest position of `stream` committed to `table` (freshly re-read from the log), or
/// `None` when no commit wrote one.
pub(super) async fn committed_in(
    table: &mut DeltaTable,
    name: &str,
    source: &str,
    stream: &StreamId,
) -> Result<Option<Position>, DeltaSinkError> {
    let delta_err = |e| DeltaSinkError::Delta {
        table: source.to_owned(),
        source: e,
    };
    table.update_state().await.map_err(delta_err)?;
    let log_store = table.log_store();
    let state = table.snapshot().map_err(delta_err)?;
    let (major_id, minor_id) = app_ids(name, stream);
    let Some(major) = state
        .transaction_version(log_store.as_ref(), &major_id)
        .await
        .map_err(delta_err)?
    else {
        return Ok(None);
    };
    let minor = state
        .transaction_version(log_store.as_ref(), minor_id)
        .await
        .map_err(delta_err)?;
    Ok(Some(match minor {
        Some(minor) => Position::new(stream.clone(), major, minor),
        None => Position::end_of(stream.clone(), major),
    }))
}
