//! `tributary verify`: does each pgvector table equal its PostgreSQL source table?
//!
//! What is compared, per key (the pgvector table's primary key):
//! - **missing** / **extra**: a source row the pgvector table lacks, a pgvector row the source
//!   no longer has;
//! - **payload**: the `payload` jsonb against the source row's current values, read as text and
//!   converted by the same [`convert`](crate::source::postgres::decode::convert) replication
//!   uses, then put into JSON as the sink does (`payload_columns`, else every column); numbers
//!   compare by value, and the differing columns are named;
//! - **hash**: for a source with a template, `text_hash` against the hash of the current text
//!   ([`crate::enrich::text`], the definition the enrichment stage stores);
//! - **vector**: an `embedding` that is NULL where a template applies, and, for a sample of the
//!   rows (every row with `--all-vectors`), the stored vector against a fresh embedding of the
//!   current text: a cosine below `--min-cosine` (default 0.9999; 0.999 for `halfvec`, whose
//!   16-bit floats keep only about three significant digits) is a difference ([`vectors`]).
//!
//! How: each side is read inside one read-only REPEATABLE READ transaction through a cursor
//! ordered by the key, and the two ordered streams are merged, so no table is held in memory.
//! The order must be the same in both databases and here: text keys are ordered bytewise
//! (`COLLATE "C"`) on both sides, the other key types by their own order, which
//! [`compare::cmp_key`] mirrors; a stream found out of order stops that table with an error
//! rather than reporting differences that are not there.
//!
//! Only PostgreSQL sources have a current state to compare with: Kafka topics are listed as
//! skipped. The two sides are read at slightly different moments, so a row changed meanwhile by
//! a running connector may show as a difference a second run does not repeat: verify a
//! connector that is caught up (or stopped).
//!
//! Exit codes ([`Report::exit_code`]): 0 every compared table equals its source; 1 differences
//! were found; 2 the check could not be completed (configuration, connection, a table that could
//! not be read, nothing to compare): what was found until then is still printed.

mod compare;
mod read;
mod vectors;

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, PgvectorSinkConfig, TemplatePart, parse_table_name, parse_template};
use crate::enrich::text::{render, text_hash};
use crate::pg::quote_qualified;
use read::{Ordered, SourceRow, Target, TargetRow};
use vectors::{Candidate, Model, VectorCheck};

/// Default `--min-cosine` for `vector` and `halfvec` columns.
pub const MIN_COSINE: f64 = 0.9999;
pub const MIN_COSINE_HALFVEC: f64 = 0.999;

#[derive(Debug, Clone)]
pub struct Options {
    /// Source tables (`schema.table`, or `table` in `public`) or topics; empty: every published
    /// table of `[sources.postgres]` (and every topic, listed as skipped).
    pub tables: Vec<String>,
    /// Rows per table whose vector is compared with a fresh embedding (0: none).
    pub sample: usize,
    /// Compare every row's vector.
    pub all_vectors: bool,
    /// Lowest acceptable cosine; `None`: [`MIN_COSINE`] or [`MIN_COSINE_HALFVEC`].
    pub min_cosine: Option<f64>,
    /// Difference lines printed per kind and table; the rest are counted.
    pub show: usize,
    /// How long a database may take to accept a connection.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tables: Vec::new(),
            sample: 100,
            all_vectors: false,
            min_cosine: None,
            show: 20,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why nothing could be compared.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Connection(String),
}

/// Differences found in one table, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Source rows read.
    pub rows: u64,
    pub missing: u64,
    pub extra: u64,
    pub payload: u64,
    pub hash: u64,
    pub vector: u64,
    /// Vectors compared with a fresh embedding.
    pub sampled: u64,
}

impl Counts {
    pub fn differences(&self) -> u64 {
        self.missing + self.extra + self.payload + self.hash + self.vector
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Compared(Counts),
    /// Not comparable (a Kafka topic), with the reason.
    Skipped(String),
    /// The comparison could not be completed.
    Failed(String),
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per source, in the order they were checked.
    pub tables: Vec<(String, Outcome)>,
}

impl Report {
    /// 0 clean, 1 differences, 2 incomplete (see the module doc).
    pub fn exit_code(&self) -> u8 {
        let outcomes = || self.tables.iter().map(|(_, o)| o);
        let failed = outcomes().any(|o| matches!(o, Outcome::Failed(_)));
        let compared = outcomes().any(|o| matches!(o, Outcome::Compared(_)));
        let differ = outcomes().any(|o| matches!(o, Outcome::Compared(c) if c.differences() > 0));
        match (failed || !compared, differ) {
            (true, _) => 2,
            (false, true) => 1,
            (false, false) => 0,
        }
    }
}

/// The kinds of difference, in summary order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Missing,
    Extra,
    Payload,
    Hash,
    Vector,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Payload => "payload",
            Kind::Hash => "hash",
            Kind::Vector => "vector",
        }
    }
}

/// Prints one table's difference lines (the first `show` of each kind) and counts them all.
pub(crate) struct Reporter<'w, W: Write> {
    out: &'w mut W,
    source: String,
    show: usize,
    shown: [usize; 5],
    pub counts: Counts,
}

impl<W: Write> Reporter<'_, W> {
    fn count(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Missing => &mut self.counts.missing,
            Kind::Extra => &mut self.counts.extra,
            Kind::Payload => &mut self.counts.payload,
            Kind::Hash => &mut self.counts.hash,
            Kind::Vector => &mut self.counts.vector,
        }
    }

    pub fn diff(&mut self, kind: Kind, key: &str, detail: &str) {
        *self.count(kind) += 1;
        let shown = &mut self.shown[kind as usize];
        if *shown < self.show {
            *shown += 1;
            let sep = if detail.is_empty() { "" } else { ": " };
            // A closed stdout (`| head`) only ends the listing, not the check.
            let _ = writeln!(
                self.out,
                "{:<8} {} {key}{sep}{detail}",
                kind.label(),
                self.source
            );
        }
    }

    fn summary(&mut self, template: bool, min_cosine: f64, halfvec: bool) {
        let c = &self.counts;
        let vectors = if !template {
            "no embedding template".to_owned()
        } else if halfvec {
            format!(
                "{} sampled; halfvec: minimum cosine {min_cosine}",
                c.sampled
            )
        } else {
            format!("{} sampled", c.sampled)
        };
        let _ = writeln!(
            self.out,
            "{}: {} rows, {} missing, {} extra, {} payload, {} hash, {} vector ({vectors})",
            self.source, c.rows, c.missing, c.extra, c.payload, c.hash, c.vector
        );
        let kinds = [c.missing, c.extra, c.payload, c.hash, c.vector];
        if kinds.iter().any(|&n| n > self.show as u64) {
            let _ = writeln!(
                self.out,
                "         (only the first {} differences of each kind are listed)",
                self.show
            );
        }
    }
}

/// What every table's comparison shares.
struct Ctx<'a> {
    options: &'a Options,
    sink: &'a PgvectorSinkConfig,
    templates: HashMap<String, Vec<TemplatePart>>,
    source: Client,
    target: Client,
    type_names: HashMap<u32, String>,
}

/// Compares every requested table, printing differences and a summary per table to `out`.
pub async fn run<W: Write>(
    config: &Config,
    options: &Options,
    out: &mut W,
) -> Result<Report, VerifyError> {
    let Some(sink) = &config.sinks.pgvector else {
        return Err(VerifyError::Config(
            "sinks.pgvector: section missing: there is no pgvector table to verify".into(),
        ));
    };
    if let Some(m) = options.min_cosine
        && !(-1.0..=1.0).contains(&m)
    {
        return Err(VerifyError::Config(format!(
            "--min-cosine {m}: a cosine is between -1 and 1"
        )));
    }
    let topics: Vec<&str> = config
        .sources
        .kafka
        .iter()
        .flat_map(|k| k.topics.iter().map(|t| t.name.as_str()))
        .collect();
    let pg = config.sources.postgres.as_ref();
    let mut report = Report::default();
    let skip = |topic: &str, report: &mut Report, out: &mut W| {
        let why = "a Kafka topic has no queryable current state (only PostgreSQL sources can be \
                   compared)";
        let _ = writeln!(out, "skip     {topic}: {why}");
        report
            .tables
            .push((topic.to_owned(), Outcome::Skipped(why.into())));
    };
    let mut wanted: Vec<(String, String)> = Vec::new();
    for t in &options.tables {
        if topics.contains(&t.as_str()) {
            skip(t, &mut report, out);
            continue;
        }
        if pg.is_none() {
            return Err(VerifyError::Config(format!(
                "--table {t}: not a topic of [sources.kafka], and there is no [sources.postgres] \
                 to read a table from"
            )));
        }
        wanted.push(parse_table_name(t).map_err(|m| VerifyError::Config(format!("--table {m}")))?);
    }
    if options.tables.is_empty() {
        for t in &topics {
            skip(t, &mut report, out);
        }
    }
    let Some(pg) = pg else {
        return Ok(report);
    };
    if !options.tables.is_empty() && wanted.is_empty() {
        return Ok(report);
    }
    let mut templates = HashMap::new();
    if let Some(e) = &config.embedding {
        for (source, t) in &e.templates {
            let parts = parse_template(t)
                .map_err(|m| VerifyError::Config(format!("embedding.templates.{source:?}: {m}")))?;
            templates.insert(source.clone(), parts);
        }
    }
    let timeout = options.connect_timeout;
    let source = read::connect(&pg.url, timeout)
        .await
        .map_err(|e| VerifyError::Connection(format!("sources.postgres: {e}")))?;
    if options.tables.is_empty() {
        wanted = read::published_tables(&source, pg)
            .await
            .map_err(|e| VerifyError::Connection(format!("sources.postgres: {e}")))?;
    }
    if wanted.is_empty() {
        return Ok(report);
    }
    let type_names = read::type_names(&source)
        .await
        .map_err(|e| VerifyError::Connection(format!("sources.postgres: {e}")))?;
    let target = read::connect(&sink.url, timeout)
        .await
        .map_err(|e| VerifyError::Connection(format!("sinks.pgvector: {e}")))?;
    let ctx = Ctx {
        options,
        sink,
        templates,
        source,
        target,
        type_names,
    };
    let mut model = Model::new(config.embedding.as_ref());
    for (schema, table) in wanted {
        let name = format!("{schema}.{table}");
        let mut rep = Reporter {
            out: &mut *out,
            source: name.clone(),
            show: options.show,
            shown: [0; 5],
            counts: Counts::default(),
        };
        let outcome = match compare_table(&ctx, &schema, &table, &mut model, &mut rep).await {
            Ok(()) => {
                let _ = ctx.source.batch_execute("COMMIT").await;
                let _ = ctx.target.batch_execute("COMMIT").await;
                Outcome::Compared(rep.counts)
            }
            Err(e) => {
                let _ = ctx.source.batch_execute("ROLLBACK").await;
                let _ = ctx.target.batch_execute("ROLLBACK").await;
                let _ = writeln!(out, "FAIL     {name}: {e}");
                Outcome::Failed(e)
            }
        };
        report.tables.push((name, outcome));
    }
    Ok(report)
}

/// Merges one source table with its pgvector table, reporting every difference.
async fn compare_table<W: Write>(
    ctx: &Ctx<'_>,
    schema: &str,
    table: &str,
    model: &mut Model<'_>,
    rep: &mut Reporter<'_, W>,
) -> Result<(), String> {
    let source = format!("{schema}.{table}");
    let source_q = quote_qualified(schema, table);
    let columns = read::source_columns(&ctx.source, &source_q).await?;
    let target_table = ctx.sink.target_table(&source);
    let Some(target) = read::target(&ctx.target, &ctx.sink.schema, &target_table).await? else {
        let n: i64 = ctx
            .source
            .query_one(&format!("SELECT count(*) FROM {source_q}"), &[])
            .await
            .map_err(|e| crate::pg::error_text(&e))?
            .get(0);
        rep.counts.rows = n as u64;
        rep.counts.missing = n as u64;
        if n > 0 {
            let _ = writeln!(
                rep.out,
                "missing  {source}: the pgvector table {} does not exist ({n} source rows)",
                quote_qualified(&ctx.sink.schema, &target_table)
            );
        }
        rep.summary(ctx.templates.contains_key(&source), 0.0, false);
        return Ok(());
    };
    let key_index = target
        .keys
        .iter()
        .map(|k| {
            columns
                .iter()
                .position(|(c, _)| *c == k.name)
                .ok_or_else(|| {
                    format!(
                        "key column {} of {} is not a column of {source}",
                        k.name, target.qualified
                    )
                })
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let template = ctx.templates.get(&source);
    let min_cosine = ctx.options.min_cosine.unwrap_or(if target.halfvec {
        MIN_COSINE_HALFVEC
    } else {
        MIN_COSINE
    });
    let mut vectors = template.map(|_| {
        VectorCheck::new(
            source.clone(),
            ctx.options.all_vectors,
            ctx.options.sample,
            min_cosine,
        )
    });
    let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    let pg_err = |e: tokio_postgres::Error| crate::pg::error_text(&e);
    ctx.source.batch_execute(begin).await.map_err(pg_err)?;
    ctx.target.batch_execute(begin).await.map_err(pg_err)?;
    let src_query = read::source_query(&source_q, &columns, &target.keys);
    let dst_query = read::target_query(&target, vectors.as_ref().is_some_and(|v| v.reads_all()));
    let mut src = Ordered::new(
        read::Cursor::open(&ctx.source, "tributary_verify_source", &src_query).await?,
        source.clone(),
    );
    let mut dst = Ordered::new(
        read::Cursor::open(&ctx.target, "tributary_verify_target", &dst_query).await?,
        target.qualified.clone(),
    );
    let parse_src = |r: &tokio_postgres::Row| {
        read::parse_source(r, &columns, &target.keys, &key_index, &ctx.type_names)
    };
    let parse_dst = |r: &tokio_postgres::Row| read::parse_target(r, &target);
    let mut s = src.next(parse_src).await?;
    let mut t = dst.next(parse_dst).await?;
    loop {
        let order = match (&s, &t) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => compare::cmp_key(&a.key, &b.key),
        };
        match order {
            std::cmp::Ordering::Less => {
                if let Some(a) = &s {
                    rep.counts.rows += 1;
                    rep.diff(Kind::Missing, &show_key(&target, &a.key), "");
                }
                s = src.next(parse_src).await?;
            }
            std::cmp::Ordering::Greater => {
                if let Some(b) = &t {
                    rep.diff(Kind::Extra, &show_key(&target, &b.key), "");
                }
                t = dst.next(parse_dst).await?;
            }
            std::cmp::Ordering::Equal => {
                if let (Some(a), Some(b)) = (s.take(), t.take()) {
                    rep.counts.rows += 1;
                    let key = show_key(&target, &a.key);
                    compare_row(
                        ctx,
                        &source,
                        template,
                        &key,
                        &a,
                        b,
                        &mut vectors,
                        model,
                        rep,
                    )?;
                }
                s = src.next(parse_src).await?;
                t = dst.next(parse_dst).await?;
            }
        }
    }
    if let Some(v) = &mut vectors {
        v.finish(&ctx.target, &target, model, rep).await?;
    }
    rep.summary(template.is_some(), min_cosine, target.halfvec);
    Ok(())
}

/// Compares one row present on both sides.
#[allow(clippy::too_many_arguments)]
fn compare_row<W: Write>(
    ctx: &Ctx<'_>,
    source: &str,
    template: Option<&Vec<TemplatePart>>,
    key: &str,
    a: &SourceRow,
    b: TargetRow,
    vectors: &mut Option<VectorCheck>,
    model: &mut Model<'_>,
    rep: &mut Reporter<'_, W>,
) -> Result<(), String> {
    let expected: serde_json::Map<String, serde_json::Value> = a
        .row
        .columns()
        .filter(|c| ctx.sink.keeps_in_payload(source, &c.name))
        .map(|c| (c.name.to_string(), c.value.to_json()))
        .collect();
    let differing = compare::payload_diff(&expected, b.payload.as_ref());
    if !differing.is_empty() {
        rep.diff(Kind::Payload, key, &differing.join("; "));
    }
    let (Some(parts), Some(vectors)) = (template, vectors) else {
        return Ok(());
    };
    // A row read from the table has no unchanged-TOAST holes: it always renders.
    let Some(text) = render(parts, &a.row) else {
        return Ok(());
    };
    let hash = text_hash(&text) as i64;
    match b.text_hash {
        Some(h) if h == hash => {}
        Some(h) => rep.diff(
            Kind::Hash,
            key,
            &format!("stored text_hash {h}, the current text hashes to {hash}"),
        ),
        None => rep.diff(
            Kind::Hash,
            key,
            "text_hash is NULL where a template applies",
        ),
    }
    if b.embedding_null {
        rep.diff(
            Kind::Vector,
            key,
            "embedding is NULL where a template applies",
        );
        return Ok(());
    }
    vectors.offer(
        Candidate::new(key.to_owned(), b.key_texts, text, b.embedding),
        model,
        rep,
    )
}

/// A key as shown in difference lines: `{"id":42}`.
fn show_key(target: &Target, key: &[crate::event::Value]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = target
        .keys
        .iter()
        .zip(key)
        .map(|(k, v)| (k.name.clone(), v.to_json()))
        .collect();
    serde_json::Value::Object(map).to_string()
}
