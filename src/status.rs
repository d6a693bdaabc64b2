//! `tributary status`: where the connector stands, read from the systems themselves (not from a
//! running process, which may be down): the replication slot's acknowledged position, lag and WAL
//! status; the consumer group's committed offsets and lag per partition; each Bronze table's
//! version, files, rows and last commit; each pgvector table's rows, index and last applied
//! positions; and how many dead letters the run's destination holds (JSONL lines, topic
//! messages or `_dlq` rows, whichever is configured).

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::{Config, KafkaSourceConfig, PostgresSourceConfig};
use crate::pg::{connect, error_text, quote_qualified};
use crate::secret::Redactor;
use crate::sink::pgvector::positions_table;

#[derive(Debug, Serialize)]
pub struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<Section<SlotStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Section<Vec<PartitionStatus>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bronze: Option<Section<Vec<crate::sink::delta::BronzeTableSummary>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgvector: Option<Section<Vec<VectorTableStatus>>>,
    /// The run's dead-letter destination and how many letters it holds.
    pub dead_letters: Section<DeadLetterStatus>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterStatus {
    /// `file PATH`, `topic NAME`, `Delta table URI`, or `none`.
    pub destination: String,
    /// Letters held: lines of the file, messages in the topic (high − low watermark, summed
    /// over partitions), rows of the `_dlq` table; `None` when there is no destination.
    pub count: Option<u64>,
}

/// A section's value, or why it could not be read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Section<T> {
    Ok(T),
    Error(String),
}

impl<T> From<Result<T, String>> for Section<T> {
    fn from(r: Result<T, String>) -> Self {
        match r {
            Ok(v) => Section::Ok(v),
            Err(e) => Section::Error(e),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub slot: String,
    pub exists: bool,
    pub active: Option<bool>,
    /// The last LSN the connector acknowledged (the slot's `confirmed_flush_lsn`).
    pub acknowledged_lsn: Option<String>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL the slot holds back.
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Per table of the initial snapshot, how far it is (from the source's state tables).
    pub snapshot: Vec<SnapshotProgress>,
}

/// One table's initial snapshot: done, or the rows its recorded chunks read so far against the
/// planner's estimate, and the time left at the pace between the first and last chunk.
#[derive(Debug, Serialize, PartialEq)]
pub struct SnapshotProgress {
    pub table: String,
    /// Requested with `tributary snapshot` while the connector runs (not the initial one).
    pub on_demand: bool,
    pub done: bool,
    pub rows_read: i64,
    /// `pg_class.reltuples`; `None` before the table was first analyzed.
    pub rows_estimated: Option<i64>,
    pub percent: Option<f64>,
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (the next message it will read); `None` if never committed.
    pub committed: Option<i64>,
    pub high_watermark: Option<i64>,
    /// `high_watermark - committed`, from the broker's watermark (which some test brokers report
    /// wrongly).
    pub lag: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct VectorTableStatus {
    pub source: String,
    pub table: String,
    pub exists: bool,
    pub rows: Option<i64>,
    pub hnsw_index: Option<bool>,
    /// Last applied position per source stream, as recorded with the rows.
    pub positions: Vec<serde_json::Value>,
}

/// Reads every section; a section that cannot be read holds its error, with every secret of the
/// configuration redacted (librdkafka, object_store and PostgreSQL errors may quote values).
pub async fn collect(config: &Config, timeout: Duration) -> Status {
    let redactor = Redactor::for_config(config);
    let postgres = match &config.sources.postgres {
        Some(pg) => Some(redacted(bounded(timeout, slot(pg)).await, &redactor)),
        None => None,
    };
    let kafka = match &config.sources.kafka {
        Some(k) => Some(redacted(
            bounded(timeout, kafka(k.clone(), timeout)).await,
            &redactor,
        )),
        None => None,
    };
    let bronze = match &config.sinks.delta {
        Some(d) => Some(redacted(
            bounded(timeout, bronze_tables(config, d)).await,
            &redactor,
        )),
        None => None,
    };
    let pgvector = match &config.sinks.pgvector {
        Some(p) => Some(redacted(
            bounded(timeout, vector_tables(config, p)).await,
            &redactor,
        )),
        None => None,
    };
    let dead_letters = redacted(
        bounded(timeout, dead_letters(config, timeout)).await,
        &redactor,
    );
    Status {
        postgres,
        kafka,
        bronze,
        pgvector,
        dead_letters,
    }
}

fn redacted<T>(r: Result<T, String>, redactor: &Redactor) -> Section<T> {
    r.map_err(|e| redactor.redact(&e).into_owned()).into()
}

/// Counts the letters in whichever destination the run writes them to.
async fn dead_letters(config: &Config, timeout: Duration) -> Result<DeadLetterStatus, String> {
    match config.dead_letter_config() {
        Some((_, d)) => match (&d.path, &d.topic) {
            (Some(path), _) => {
                let count = match std::fs::read(path) {
                    Ok(bytes) => bytes.iter().filter(|b| **b == b'\n').count() as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                };
                Ok(DeadLetterStatus {
                    destination: format!("file {}", path.display()),
                    count: Some(count),
                })
            }
            (None, Some(topic)) => {
                let k = config
                    .sources
                    .kafka
                    .as_ref()
                    .ok_or("dead_letter.topic needs [sources.kafka]")?;
                let props = k.librdkafka_properties().map_err(|e| e.to_string())?;
                let topic = topic.clone();
                let count = tokio::task::spawn_blocking(move || {
                    let consumer = crate::check::kafka_consumer(&props)?;
                    let md = consumer
                        .fetch_metadata(Some(&topic), timeout)
                        .map_err(|e| format!("cannot fetch metadata: {e}"))?;
                    let mut count = 0u64;
                    for t in md.topics().iter().filter(|t| t.name() == topic) {
                        for p in t.partitions() {
                            let (low, high) = consumer
                                .fetch_watermarks(&topic, p.id(), timeout)
                                .map_err(|e| format!("topic {topic}: {e}"))?;
                            count += u64::try_from(high - low).unwrap_or(0);
                        }
                    }
                    Ok::<_, String>((topic, count))
                })
                .await
                .map_err(|e| e.to_string())??;
                Ok(DeadLetterStatus {
                    destination: format!("topic {}", count.0),
                    count: Some(count.1),
                })
            }
            (None, None) => Err("dead_letter: give `path` or `topic`".into()),
        },
        None => match &config.sinks.delta {
            Some(d) => {
                let sink = crate::sink::delta::DeltaSink::new(&config.name, d)
                    .map_err(|e| e.to_string())?;
                let dlq = crate::sink::delta::DLQ_TABLE;
                let exists = sink
                    .existing_tables()
                    .await
                    .map_err(|e| e.to_string())?
                    .iter()
                    .any(|t| t == dlq);
                let count = match exists {
                    true => sink.summary(dlq).await.map_err(|e| e.to_string())?.rows,
                    false => 0,
                };
                Ok(DeadLetterStatus {
                    destination: format!("Delta table {}", sink.table_uri(dlq)),
                    count: Some(count),
                })
            }
            None => Ok(DeadLetterStatus {
                destination: "none".into(),
                count: None,
            }),
        },
    }
}

async fn bronze_tables(
    config: &Config,
    d: &crate::config::DeltaSinkConfig,
) -> Result<Vec<crate::sink::delta::BronzeTableSummary>, String> {
    let sink = crate::sink::delta::DeltaSink::new(&config.name, d).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for dir in sink.existing_tables().await.map_err(|e| e.to_string())? {
        out.push(sink.summary(&dir).await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The snapshot's progress per table, read from `state_table` and its chunk table (empty when
/// they do not exist yet).
pub async fn snapshot_progress(
    client: &tokio_postgres::Client,
    pg: &PostgresSourceConfig,
) -> Result<Vec<SnapshotProgress>, String> {
    let (schema, name) = crate::config::parse_table_name(&pg.state_table)?;
    let state = quote_qualified(&schema, &name);
    let chunks = quote_qualified(&schema, &format!("{name}_chunks"));
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[&state, &chunks],
        )
        .await
        .map_err(|e| error_text(&e))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT s.schema_name || '.' || s.table_name, s.done,
                        COALESCE(sum(c.rows), 0)::int8,
                        (SELECT CASE WHEN k.reltuples >= 0 THEN k.reltuples::int8 END
                           FROM pg_class k
                          WHERE k.oid = to_regclass(quote_ident(s.schema_name) || '.'
                                                    || quote_ident(s.table_name))),
                        extract(epoch FROM max(c.recorded_at) - min(c.recorded_at))::float8,
                        COALESCE(sum(c.rows) FILTER (WHERE c.recorded_at > (
                            SELECT min(f.recorded_at) FROM {chunks} f
                             WHERE (f.slot, f.schema_name, f.table_name)
                                 = (s.slot, s.schema_name, s.table_name))), 0)::int8
                   FROM {state} s
                   LEFT JOIN {chunks} c USING (slot, schema_name, table_name)
                  WHERE s.slot = $1
                  GROUP BY s.slot, s.schema_name, s.table_name, s.done
                  ORDER BY 1"
            ),
            &[&pg.slot],
        )
        .await
        .map_err(|e| error_text(&e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (done, read): (bool, i64) = (r.get(1), r.get(2));
            let estimated: Option<i64> = r.get(3);
            // Rows read after the first chunk was recorded, over the time since.
            let (seconds, since_first): (Option<f64>, i64) = (r.get(4), r.get(5));
            let left = estimated.map(|e| (e - read).max(0));
            SnapshotProgress {
                table: r.get(0),
                on_demand: false,
                done,
                rows_read: read,
                rows_estimated: estimated,
                percent: (!done)
                    .then_some(estimated)
                    .flatten()
                    .filter(|e| *e > 0)
                    .map(|e| (100.0 * read as f64 / e as f64).min(100.0)),
                eta_seconds: match (done, seconds, left) {
                    (false, Some(s), Some(left)) if s > 0.0 && since_first > 0 => {
                        Some(left as f64 * s / since_first as f64)
                    }
                    _ => None,
                },
            }
        })
        .collect())
}

/// The on-demand snapshots' progress (`tributary snapshot`), oldest first: the time left at the
/// pace since the request was taken up.
pub async fn on_demand_progress(
    client: &tokio_postgres::Client,
    pg: &PostgresSourceConfig,
) -> Result<Vec<SnapshotProgress>, String> {
    use crate::source::postgres::incremental;
    Ok(incremental::progress(client, pg, None)
        .await?
        .into_iter()
        .map(|p| {
            let left = p.estimated.map(|e| (e - p.rows).max(0));
            SnapshotProgress {
                table: p.table,
                on_demand: true,
                done: p.done,
                rows_read: p.rows,
                rows_estimated: p.estimated,
                percent: (!p.done)
                    .then_some(p.estimated)
                    .flatten()
                    .filter(|e| *e > 0)
                    .map(|e| (100.0 * p.rows as f64 / e as f64).min(100.0)),
                eta_seconds: match (p.done, p.seconds, left) {
                    (false, Some(s), Some(left)) if s > 0.0 && p.rows > 0 => {
                        Some(left as f64 * s / p.rows as f64)
                    }
                    _ => None,
                },
            }
        })
        .collect())
}

async fn slot(pg: &PostgresSourceConfig) -> Result<SlotStatus, String> {
    let client = connect(&pg.url).await?;
    let mut snapshot = snapshot_progress(&client, pg).await?;
    snapshot.extend(on_demand_progress(&client, pg).await?);
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text,
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .map_err(|e| error_text(&e))?;
    Ok(match row {
        None => SlotStatus {
            slot: pg.slot.clone(),
            exists: false,
            active: None,
            acknowledged_lsn: None,
            lag_bytes: None,
            wal_status: None,
            snapshot,
        },
        Some(r) => SlotStatus {
            slot: pg.slot.clone(),
            exists: true,
            active: r.get(0),
            acknowledged_lsn: r.get(1),
            lag_bytes: r.get(2),
            wal_status: r.get(3),
            snapshot,
        },
    })
}

async fn kafka(k: KafkaSourceConfig, timeout: Duration) -> Result<Vec<PartitionStatus>, String> {
    let props = k.librdkafka_properties().map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        let (consumer, md) = crate::check::kafka_metadata(&props, timeout)?;
        let mut tpl = TopicPartitionList::new();
        for t in &k.topics {
            let topic = md
                .topics()
                .iter()
                .find(|m| m.name() == t.name)
                .ok_or_else(|| format!("topic {:?} does not exist", t.name))?;
            for p in topic.partitions() {
                tpl.add_partition(&t.name, p.id());
            }
        }
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .map_err(|e| format!("cannot read committed offsets: {e}"))?;
        let mut out = Vec::new();
        for e in committed.elements() {
            let committed = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let high = consumer
                .fetch_watermarks(e.topic(), e.partition(), timeout)
                .ok()
                .map(|(_, h)| h);
            out.push(PartitionStatus {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                committed,
                high_watermark: high,
                lag: high.map(|h| h - committed.unwrap_or(0)),
            });
        }
        Ok(out)
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn vector_tables(
    config: &Config,
    p: &crate::config::PgvectorSinkConfig,
) -> Result<Vec<VectorTableStatus>, String> {
    let client = connect(&p.url).await?;
    let sources = config.known_sources().unwrap_or_default();
    let positions_table = positions_table(&p.schema);
    let has_positions: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&positions_table])
        .await
        .map_err(|e| error_text(&e))?
        .get(0);
    let mut out = Vec::new();
    for source in sources {
        let table = p.target_table(&source);
        let qualified = quote_qualified(&p.schema, &table);
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
            .await
            .map_err(|e| error_text(&e))?
            .get(0);
        let (mut rows, mut hnsw, mut positions) = (None, None, Vec::new());
        if exists {
            rows = Some(
                client
                    .query_one(&format!("SELECT count(*) FROM {qualified}"), &[])
                    .await
                    .map_err(|e| error_text(&e))?
                    .get(0),
            );
            hnsw = Some(
                client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                           JOIN pg_am am ON am.oid = c.relam
                          WHERE i.indrelid = to_regclass($1) AND am.amname = 'hnsw')",
                        &[&qualified],
                    )
                    .await
                    .map_err(|e| error_text(&e))?
                    .get(0),
            );
        }
        if has_positions {
            positions = client
                .query(
                    &format!(
                        "SELECT position FROM {positions_table} WHERE source = $1 ORDER BY stream"
                    ),
                    &[&source],
                )
                .await
                .map_err(|e| error_text(&e))?
                .iter()
                .map(|r| r.try_get(0).map_err(|e| error_text(&e)))
                .collect::<Result<_, _>>()?;
        }
        out.push(VectorTableStatus {
            source,
            table: format!("{}.{table}", p.schema),
            exists,
            rows,
            hnsw_index: hnsw,
            positions,
        });
    }
    Ok(out)
}

/// The one-screen text form.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    match &s.postgres {
        Some(Section::Ok(slot)) if slot.exists => line(format!(
            "postgres  slot {}  acknowledged {}  lag {} bytes  wal_status {}  {}",
            slot.slot,
            slot.acknowledged_lsn.as_deref().unwrap_or("-"),
            slot.lag_bytes.map_or("-".into(), |b| b.to_string()),
            slot.wal_status.as_deref().unwrap_or("-"),
            if slot.active == Some(true) {
                "active"
            } else {
                "inactive"
            }
        )),
        Some(Section::Ok(slot)) => line(format!("postgres  slot {} does not exist yet", slot.slot)),
        Some(Section::Error(e)) => line(format!("postgres  error: {e}")),
        None => {}
    }
    if let Some(Section::Ok(slot)) = &s.postgres {
        for t in slot.snapshot.iter().filter(|t| !t.done) {
            line(format!(
                "snapshot  {}{}  {} of ~{} rows ({})  eta {}",
                t.table,
                if t.on_demand { " (on demand)" } else { "" },
                t.rows_read,
                t.rows_estimated.map_or("?".into(), |e| e.to_string()),
                t.percent.map_or("-".into(), |p| format!("{p:.1}%")),
                t.eta_seconds.map_or("-".into(), |s| format!("{s:.0}s")),
            ));
        }
    }
    match &s.kafka {
        Some(Section::Ok(parts)) => {
            for p in parts {
                line(format!(
                    "kafka     {}[{}]  committed {}  high watermark {}  lag {}",
                    p.topic,
                    p.partition,
                    p.committed.map_or("-".into(), |o| o.to_string()),
                    p.high_watermark.map_or("-".into(), |o| o.to_string()),
                    p.lag.map_or("-".into(), |o| o.to_string()),
                ));
            }
        }
        Some(Section::Error(e)) => line(format!("kafka     error: {e}")),
        None => {}
    }
    match &s.bronze {
        Some(Section::Ok(tables)) => {
            for t in tables {
                line(format!(
                    "bronze    {}  version {}  {} files  {} rows{}  last commit {}",
                    t.table,
                    t.version,
                    t.files,
                    t.rows,
                    if t.table == "_dlq" {
                        " (dead letters)"
                    } else {
                        ""
                    },
                    t.last_commit.as_deref().unwrap_or("-")
                ));
            }
        }
        Some(Section::Error(e)) => line(format!("bronze    error: {e}")),
        None => {}
    }
    match &s.pgvector {
        Some(Section::Ok(tables)) => {
            for t in tables {
                if !t.exists {
                    line(format!(
                        "pgvector  {} ({}): not created yet",
                        t.table, t.source
                    ));
                    continue;
                }
                let positions: Vec<String> = t
                    .positions
                    .iter()
                    .filter_map(|p| {
                        serde_json::from_value::<crate::event::Position>(p.clone()).ok()
                    })
                    .map(|p| p.to_string())
                    .collect();
                line(format!(
                    "pgvector  {} ({})  {} rows  hnsw {}  applied up to {}",
                    t.table,
                    t.source,
                    t.rows.unwrap_or(0),
                    if t.hnsw_index == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                    if positions.is_empty() {
                        "-".into()
                    } else {
                        positions.join(", ")
                    }
                ));
            }
        }
        Some(Section::Error(e)) => line(format!("pgvector  error: {e}")),
        None => {}
    }
    match &s.dead_letters {
        Section::Ok(d) => line(format!(
            "dead letters  {}  {}",
            d.destination,
            d.count.map_or("-".into(), |c| c.to_string())
        )),
        Section::Error(e) => line(format!("dead letters  error: {e}")),
    }
    out
}
