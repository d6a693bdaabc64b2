//! Schema evolution of a Bronze table: source columns become typed columns, never lost.
//!
//! Guarantees: a column a source declares and the table lacks is added (nullable) in a commit of
//! its own before the first data that fills it; a column whose type changed incompatibly is never
//! coerced or dropped: each event carrying it is rejected as a dead letter for `_dlq` (logged once
//! per distinct error, counted every time in `tributary_delta_schema_rejections_total`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use deltalake::kernel::StructField;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::{DeltaTable, DeltaTableError};

use super::{DeltaSink, DeltaSinkError, bronze};
use crate::dead_letter::DeadLetter;
use crate::event::{ChangeEvent, RowSchema};

/// The table's current schema in Arrow form.
pub(super) fn table_arrow_schema(table: &DeltaTable) -> Result<SchemaRef, DeltaTableError> {
    Ok(table.snapshot()?.snapshot().arrow_schema())
}

/// The table schema that holds `events`: `base` plus a nullable typed column for every column
/// an event's source schema declares and the table lacks. Per event, `Some(reason)` when one of
/// its declared columns has a type the table cannot hold (an incompatible change): such an event
/// is a dead letter, never silently dropped or coerced.
pub(super) fn evolve(
    source: &str,
    base: &SchemaRef,
    events: &[&ChangeEvent],
) -> (SchemaRef, Vec<Option<String>>) {
    let mut fields: Vec<FieldRef> = base.fields().iter().cloned().collect();
    // A table written by an earlier version lacks the newer metadata columns: added like any
    // new column (older rows read NULL).
    for f in bronze::bronze_schema().fields() {
        if !fields.iter().any(|g| g.name() == f.name()) {
            fields.push(f.clone());
        }
    }
    let mut verdicts: HashMap<*const RowSchema, Option<String>> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let Some(schema) = &e.schema else {
            out.push(None);
            continue;
        };
        let verdict = verdicts
            .entry(Arc::as_ptr(schema))
            .or_insert_with(|| {
                let mut new = Vec::new();
                for (name, ty) in &schema.columns {
                    // A source column named like a metadata column stays in `_payload`.
                    if bronze::METADATA_COLUMNS.contains(&name.as_str()) {
                        continue;
                    }
                    let wanted = bronze::arrow_type(*ty);
                    match fields.iter().find(|f| f.name() == name) {
                        Some(f) if bronze::same_type(f.data_type(), &wanted) => {}
                        Some(f) => {
                            return Some(format!(
                                "Bronze table {source}: column {name:?} is {} in the table but the \
                                 source now sends {ty:?} values ({wanted}); an incompatible \
                                 schema change (rewrite the table, or route the source to a new \
                                 table, to accept it)",
                                f.data_type()
                            ));
                        }
                        None => new.push(Arc::new(Field::new(name, wanted, true))),
                    }
                }
                fields.extend(new);
                None
            })
            .clone();
        out.push(verdict);
    }
    (Arc::new(Schema::new(fields)), out)
}

/// Adds to `table` the columns of `schema` it lacks (one metadata commit); returns whether any
/// were added.
pub(super) async fn add_missing_columns(
    table: &mut DeltaTable,
    source: &str,
    schema: &SchemaRef,
) -> Result<bool, DeltaSinkError> {
    let delta_err = |e| DeltaSinkError::Delta {
        table: source.to_owned(),
        source: e,
    };
    let current = table_arrow_schema(table).map_err(delta_err)?;
    let added: Vec<&FieldRef> = schema
        .fields()
        .iter()
        .filter(|f| current.field_with_name(f.name()).is_err())
        .collect();
    if added.is_empty() {
        return Ok(false);
    }
    let mut fields = Vec::with_capacity(added.len());
    for f in &added {
        let field: StructField = f
            .as_ref()
            .try_into_kernel()
            .map_err(|e| delta_err(e.into()))?;
        fields.push(field);
    }
    let names: Vec<&str> = added.iter().map(|f| f.name().as_str()).collect();
    let evolved = table
        .clone()
        .add_columns()
        .with_fields(fields)
        .await
        .map_err(delta_err)?;
    *table = evolved;
    tracing::info!(table = source, columns = ?names, "Bronze table schema evolved");
    Ok(true)
}

impl DeltaSink {
    /// The dead letter for an event of `source` that [`evolve`] rejected with `error`.
    pub(super) fn reject(
        &mut self,
        source: &str,
        event: &ChangeEvent,
        error: String,
    ) -> DeadLetter {
        if self.reported.insert(error.clone()) {
            tracing::error!(table = source, %error, "incompatible schema change: events go to the dead-letter table");
        }
        metrics::counter!("tributary_delta_schema_rejections_total", "table" => source.to_owned())
            .increment(1);
        let raw = serde_json::to_vec(event).unwrap_or_default();
        let key = (!event.key.is_empty()).then(|| event.key.to_json().to_string());
        DeadLetter::new(source, event.position.clone(), key, &raw, error)
    }
}
