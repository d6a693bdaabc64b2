//! Unchanged-TOAST values resolved in order, never guessed.
//!
//! PostgreSQL leaves a TOASTed column out of an update that did not change it
//! ([`Value::UnchangedToast`]). Its value is the latest state of that row before the event, found
//! in this order:
//! 1. `batch`: an earlier event of the same row in the same batch;
//! 2. `cache`: the row state this stage remembers from earlier batches ([`RowState`]: the
//!    template columns and every large value, bounded by `embedding.cache_capacity` rows);
//! 3. `sink`: the row's stored pgvector payload (the sink's state before this batch; only for
//!    types whose JSON form reads back exactly: text, numeric, bytea, vector);
//! 4. `source`: the row read from the source by primary key, at or after the event's position
//!    (a later change of that column is a later event, which overwrites it again).
//!
//! A key move (an update whose old key differs) is the same row: tiers 1–3 look it up under its
//! old key, the source read under its new one. What no tier has stays `UnchangedToast` (the
//! sinks then keep their stored value) and is counted as `unresolved`.
//!
//! Metrics: `tributary_toast_resolved_total{from}` (`batch`, `cache`, `sink`, `source`,
//! `unresolved`) and `tributary_toast_source_reads_total{source}`, so a table that pays for many
//! source reads is visible.

use std::collections::{HashMap, HashSet};

use super::Cache;
use crate::event::{ChangeEvent, Name, Op, Row, Value, ValueType};

/// Values at least this large (text bytes, array/vector elements × 8) are remembered for every
/// column, not only template columns: PostgreSQL moves large values out of line first.
const REMEMBER_BYTES: usize = 256;

/// A row in the resolver's keying: its source and its key as JSON text.
pub type RowKey = (String, String);

/// Where a resolved value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Batch,
    Cache,
    Sink,
    Source,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Batch => "batch",
            Tier::Cache => "cache",
            Tier::Sink => "sink",
            Tier::Source => "source",
        }
    }
}

/// A row whose state before this batch must be looked up outside the stage.
#[derive(Debug, Clone)]
pub struct Need {
    pub row: RowKey,
    pub source: String,
    /// The key the sink stores the row under (the old key of a moved row).
    pub stored_key: Row,
    /// The key the source holds the row under now (the event's key).
    pub source_key: Row,
    /// The columns to find, with their types when the source said.
    pub columns: Vec<(Name, Option<ValueType>)>,
}

/// Values found outside the stage, per row.
pub type Fetched = HashMap<RowKey, Vec<(Name, Value, Tier)>>;

/// The remembered state of rows: the columns a later unchanged-TOAST value may need.
#[derive(Debug)]
pub struct RowState {
    cache: Cache<Vec<(Name, Value)>>,
    /// Template columns per source: always remembered, whatever their size.
    template_columns: HashMap<String, HashSet<String>>,
}

impl RowState {
    pub fn new(capacity: usize, template_columns: HashMap<String, HashSet<String>>) -> Self {
        RowState {
            cache: Cache::new(capacity),
            template_columns,
        }
    }

    /// The rows of `events` that have unchanged-TOAST columns neither an earlier event of the
    /// batch nor the remembered state can fill, with the columns wanted.
    pub fn needs(&self, events: &[ChangeEvent]) -> Vec<Need> {
        let mut seen: HashSet<RowKey> = HashSet::new();
        let mut truncated: HashSet<&str> = HashSet::new();
        let mut needs: Vec<Need> = Vec::new();
        for e in events {
            match e.op {
                Op::Truncate => {
                    truncated.insert(e.source.as_str());
                    continue;
                }
                Op::Delete => {
                    seen.insert(row_key(&e.source, &e.key));
                    continue;
                }
                _ => {}
            }
            let Some(after) = &e.after else { continue };
            let old = old_key(e);
            let lookup = row_key(&e.source, old.as_ref().unwrap_or(&e.key));
            let here = row_key(&e.source, &e.key);
            if after.has_unchanged_toast()
                && !seen.contains(&lookup)
                && !truncated.contains(e.source.as_str())
            {
                let remembered = self.cache.get(&lookup);
                let columns: Vec<(Name, Option<ValueType>)> = after
                    .columns()
                    .filter(|c| c.value == Value::UnchangedToast)
                    .filter(|c| !remembered.is_some_and(|r| r.iter().any(|(n, _)| *n == c.name)))
                    .map(|c| (c.name.clone(), column_type(e, &c.name)))
                    .collect();
                if !columns.is_empty() {
                    match needs.iter_mut().find(|n| n.row == lookup) {
                        Some(n) => {
                            for c in columns {
                                if !n.columns.iter().any(|(x, _)| *x == c.0) {
                                    n.columns.push(c);
                                }
                            }
                        }
                        None => needs.push(Need {
                            row: lookup.clone(),
                            source: e.source.clone(),
                            stored_key: old.clone().unwrap_or_else(|| e.key.clone()),
                            source_key: e.key.clone(),
                            columns,
                        }),
                    }
                }
            }
            seen.insert(lookup);
            seen.insert(here);
        }
        needs
    }

    /// Fills the unchanged-TOAST values of `events` in order (see the module doc) and remembers
    /// the state the batch leaves. `fetched` holds what [`RowState::needs`] asked for.
    pub fn resolve(&mut self, events: &mut [ChangeEvent], fetched: &Fetched) {
        let any_toast = events
            .iter()
            .any(|e| e.after.as_ref().is_some_and(Row::has_unchanged_toast));
        // The resolved rows of this batch so far (only kept when some event needs them).
        let mut batch: HashMap<RowKey, Row> = HashMap::new();
        for e in events.iter_mut() {
            match e.op {
                Op::Truncate => {
                    batch.retain(|(s, _), _| *s != e.source);
                    self.cache.retain(|(s, _)| *s != e.source);
                    continue;
                }
                Op::Delete => {
                    let k = row_key(&e.source, &e.key);
                    batch.remove(&k);
                    self.cache.remove(&k);
                    continue;
                }
                _ => {}
            }
            let old = old_key(e).map(|k| row_key(&e.source, &k));
            let here = row_key(&e.source, &e.key);
            let lookup = old.clone().unwrap_or_else(|| here.clone());
            let Some(after) = e.after.as_mut() else {
                continue;
            };
            if after.has_unchanged_toast() {
                let earlier = batch.get(&lookup);
                let remembered = self.cache.get(&lookup);
                let found = fetched.get(&lookup);
                for c in after.columns_mut() {
                    if c.value != Value::UnchangedToast {
                        continue;
                    }
                    let value = earlier
                        .and_then(|r| r.get(&c.name))
                        .filter(|v| **v != Value::UnchangedToast)
                        .map(|v| (v.clone(), Tier::Batch))
                        .or_else(|| {
                            remembered
                                .and_then(|r| r.iter().find(|(n, _)| *n == c.name))
                                .map(|(_, v)| (v.clone(), Tier::Cache))
                        })
                        .or_else(|| {
                            found
                                .and_then(|f| f.iter().find(|(n, _, _)| *n == c.name))
                                .map(|(_, v, t)| (v.clone(), *t))
                        });
                    match value {
                        Some((v, tier)) => {
                            c.value = v;
                            metrics::counter!("tributary_toast_resolved_total", "from" => tier.label())
                                .increment(1);
                        }
                        None => {
                            metrics::counter!("tributary_toast_resolved_total", "from" => "unresolved")
                                .increment(1);
                        }
                    }
                }
            }
            let remember = self.remembered_columns(&e.source, after);
            if let Some(old) = &old {
                batch.remove(old);
                self.cache.remove(old);
            }
            if any_toast {
                batch.insert(here.clone(), after.clone());
            }
            if remember.is_empty() {
                self.cache.remove(&here);
            } else {
                self.cache.put(here, remember);
            }
        }
    }

    /// The columns of `row` worth remembering: template columns and large values.
    fn remembered_columns(&self, source: &str, row: &Row) -> Vec<(Name, Value)> {
        let template = self.template_columns.get(source);
        row.columns()
            .filter(|c| c.value != Value::UnchangedToast)
            .filter(|c| {
                template.is_some_and(|t| t.contains(c.name.as_str()))
                    || approx_size(&c.value) >= REMEMBER_BYTES
            })
            .map(|c| (c.name.clone(), c.value.clone()))
            .collect()
    }
}

/// The row key of `key` in `source`.
pub fn row_key(source: &str, key: &Row) -> RowKey {
    (source.to_owned(), key.to_json().to_string())
}

/// The old key of an update that moved its row to a new key; `None` otherwise.
pub fn old_key(e: &ChangeEvent) -> Option<Row> {
    if e.op != Op::Update {
        return None;
    }
    let before = e.before.as_ref()?;
    let mut old = Row::new();
    for c in e.key.columns() {
        old.push(c.name.clone(), before.get(&c.name)?.clone());
    }
    (old != e.key).then_some(old)
}

fn column_type(e: &ChangeEvent, column: &str) -> Option<ValueType> {
    let schema = e.schema.as_ref()?;
    schema
        .columns
        .iter()
        .find(|(n, _)| n == column)
        .map(|(_, t)| *t)
}

fn approx_size(v: &Value) -> usize {
    match v {
        Value::Text(s) | Value::Numeric(s) => s.len(),
        Value::Json(j) => j.as_str().len(),
        Value::Bytes(b) => b.len(),
        Value::Array(a) => a.len() * 8,
        Value::Vector(v) => v.len() * 4,
        _ => 0,
    }
}

/// A value of type `ty` from its JSON form in a stored pgvector payload, for the types whose JSON
/// form reads back as exactly the value the source sent; `None` for the others (the source read
/// answers for them).
pub fn value_from_stored(json: &serde_json::Value, ty: Option<ValueType>) -> Option<Value> {
    use serde_json::Value as J;
    match (ty?, json) {
        (_, J::Null) => Some(Value::Null),
        (ValueType::Text, J::String(s)) => Some(Value::Text(s.as_str().into())),
        (ValueType::Numeric, J::String(s)) => Some(Value::Numeric(s.as_str().into())),
        (ValueType::Bytes, J::String(s)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .ok()
                .map(Value::Bytes)
        }
        (ValueType::Vector, J::Array(items)) => items
            .iter()
            .map(|i| i.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .map(Value::Vector),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    fn update(id: i64, note: &str, big: Option<&str>) -> ChangeEvent {
        let after: Row = [
            ("id", Value::Int64(id)),
            ("note", Value::Text(note.into())),
            (
                "big",
                big.map_or(Value::UnchangedToast, |b| Value::Text(b.into())),
            ),
        ]
        .into_iter()
        .collect();
        ChangeEvent {
            source: "public.t".into(),
            op: Op::Update,
            key: [("id", Value::Int64(id))].into_iter().collect(),
            before: None,
            after: Some(after),
            schema_version: 1,
            position: crate::source::postgres::position(Lsn(1), 0),
            source_ts: None,
            embedding: None,
            text_hash: None,
            chunks: None,
            schema: None,
            origin: None,
        }
    }

    fn moved(from: i64, mut e: ChangeEvent) -> ChangeEvent {
        e.before = Some([("id", Value::Int64(from))].into_iter().collect());
        e
    }

    fn big_of(e: &ChangeEvent) -> Value {
        e.after
            .as_ref()
            .and_then(|a| a.get("big"))
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn state() -> RowState {
        let templates = [(
            "public.t".to_owned(),
            ["note".to_owned(), "big".to_owned()].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        RowState::new(100, templates)
    }

    #[test]
    fn later_changes_of_a_batch_take_the_latest_earlier_value() {
        let mut s = state();
        // The TOASTed column changes, then another column in the next transaction.
        let mut batch = vec![update(1, "a", Some("B1")), update(1, "b", None)];
        assert!(s.needs(&batch).is_empty());
        s.resolve(&mut batch, &Fetched::new());
        assert_eq!(big_of(&batch[1]), Value::Text("B1".into()));
        // Next batch: from the remembered state.
        let mut next = vec![update(1, "c", None)];
        assert!(s.needs(&next).is_empty());
        s.resolve(&mut next, &Fetched::new());
        assert_eq!(big_of(&next[0]), Value::Text("B1".into()));
    }

    #[test]
    fn a_moved_row_is_looked_up_under_its_old_key() {
        let mut s = state();
        let mut first = vec![update(1, "a", Some("B1"))];
        s.resolve(&mut first, &Fetched::new());
        let mut batch = vec![moved(1, update(2, "a", None))];
        assert!(s.needs(&batch).is_empty());
        s.resolve(&mut batch, &Fetched::new());
        assert_eq!(big_of(&batch[0]), Value::Text("B1".into()));
        // The old key is forgotten; the new one remembered.
        let again = vec![update(1, "x", None), update(2, "y", None)];
        let needs = s.needs(&again);
        assert_eq!(needs.len(), 1, "{needs:?}");
        assert_eq!(needs[0].row, row_key("public.t", &again[0].key));
    }

    #[test]
    fn a_cold_row_asks_once_and_uses_what_was_fetched() {
        let mut s = state();
        let mut batch = vec![
            moved(7, update(8, "a", None)),
            update(8, "b", None),
            update(9, "c", Some("new")),
        ];
        let needs = s.needs(&batch);
        assert_eq!(needs.len(), 1, "{needs:?}");
        let n = &needs[0];
        assert_eq!(n.stored_key.get("id"), Some(&Value::Int64(7)));
        assert_eq!(n.source_key.get("id"), Some(&Value::Int64(8)));
        assert_eq!(n.columns.len(), 1);
        let mut fetched = Fetched::new();
        fetched.insert(
            n.row.clone(),
            vec![("big".into(), Value::Text("stored".into()), Tier::Sink)],
        );
        s.resolve(&mut batch, &fetched);
        assert_eq!(big_of(&batch[0]), Value::Text("stored".into()));
        assert_eq!(big_of(&batch[1]), Value::Text("stored".into()));
        assert_eq!(big_of(&batch[2]), Value::Text("new".into()));
    }

    #[test]
    fn nothing_found_stays_unchanged_toast_and_deletes_forget() {
        let mut s = state();
        let mut batch = vec![update(3, "a", None)];
        s.resolve(&mut batch, &Fetched::new());
        assert_eq!(big_of(&batch[0]), Value::UnchangedToast);
        let mut first = vec![update(4, "a", Some("B"))];
        s.resolve(&mut first, &Fetched::new());
        let mut del = update(4, "", None);
        del.op = Op::Delete;
        del.after = None;
        s.resolve(&mut [del], &Fetched::new());
        assert_eq!(s.needs(&[update(4, "b", None)]).len(), 1);
    }

    #[test]
    fn stored_values_read_back_only_when_exact() {
        let j = serde_json::json!("aGk=");
        assert_eq!(
            value_from_stored(&j, Some(ValueType::Bytes)),
            Some(Value::Bytes(b"hi".to_vec()))
        );
        assert_eq!(
            value_from_stored(&serde_json::json!("x"), Some(ValueType::Text)),
            Some(Value::Text("x".into()))
        );
        assert_eq!(
            value_from_stored(&serde_json::json!({"a": 1}), Some(ValueType::Json)),
            None
        );
        assert_eq!(value_from_stored(&serde_json::json!("x"), None), None);
    }
}
