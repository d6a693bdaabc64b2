//! Stream positions as Delta `txn` actions: what a commit writes and what a table holds.
//!
//! Guarantees: [`txn_actions`] and [`committed_in`] use the same app ids, so what `committed_in`
//! reads back is the position the last commit for that stream recorded (the highest: commits only
//! move a stream forward). App ids are `{name}:{stream}` (`…:postgres`,
//! `…:kafka:{topic}:{partition}`); a PostgreSQL position needs two integers, so it takes two app
//! ids (`…:postgres` = commit LSN, `…:postgres:ordinal` = ordinal) in the same commit.

use deltalake::DeltaTable;
use deltalake::kernel::Transaction;

use super::DeltaSinkError;
use crate::event::{Lsn, Position, StreamId};

/// The txn app ids (and how to read a position from their versions) for one stream.
fn app_ids(name: &str, stream: &StreamId) -> (String, Option<String>) {
    match stream {
        StreamId::Postgres => (
            format!("{name}:postgres"),
            Some(format!("{name}:postgres:ordinal")),
        ),
        StreamId::Kafka { .. } => (format!("{name}:{stream}"), None),
    }
}

/// The `txn` actions recording `pos` as the highest position of its stream.
pub(super) fn txn_actions(name: &str, pos: &Position) -> Vec<Transaction> {
    let (major_id, minor_id) = app_ids(name, &pos.stream());
    match pos {
        Position::Lsn {
            commit_lsn,
            tx_ordinal,
        } => {
            let mut v = vec![Transaction::new(major_id, commit_lsn.0 as i64)];
            if let Some(id) = minor_id {
                v.push(Transaction::new(id, *tx_ordinal as i64));
            }
            v
        }
        Position::Kafka { offset, .. } => vec![Transaction::new(major_id, *offset)],
    }
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
    Ok(Some(match stream {
        StreamId::Postgres => {
            let minor = match minor_id {
                Some(id) => state
                    .transaction_version(log_store.as_ref(), id)
                    .await
                    .map_err(delta_err)?
                    .unwrap_or(i64::MAX),
                None => i64::MAX,
            };
            Position::Lsn {
                commit_lsn: Lsn(major as u64),
                tx_ordinal: minor as u64,
            }
        }
        StreamId::Kafka { topic, partition } => Position::Kafka {
            topic: topic.clone(),
            partition: *partition,
            offset: major,
        },
    }))
}
