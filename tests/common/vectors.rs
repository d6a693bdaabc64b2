//! The pgvector table against its source: every difference a user would care about.

use tributary::config::parse_template;
use tributary::enrich::Embedder;
use tributary::enrich::text::{render, text_hash};
use tributary::event::{Row, Value};

/// A ~4 kB text that differs per `(id, version)` and does not compress away (so, under
/// `STORAGE EXTERNAL`, PostgreSQL stores it out of line: a TOASTed value).
pub fn big(id: i32, version: i32) -> String {
    let (id, version) = (i64::from(id), i64::from(version));
    (0..400i64)
        .map(|i| {
            format!(
                "{:09x}",
                (i * 7919 + id * 104_729 + version * 13).rem_euclid(999_999_937)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A pgvector row as read back: key, payload values, text hash, embedding.
type StoredRow = (
    i32,
    Vec<Option<String>>,
    Option<i64>,
    Option<pgvector::Vector>,
);

/// Every difference between the pgvector table and the source table: keys, payload columns
/// (the first `in_payload` of `columns`, which `source_sql` selects in order, `id` first), text
/// hash, and the vector against a fresh embedding of the current text.
#[allow(clippy::too_many_arguments)]
pub async fn divergence(
    src: &tokio_postgres::Client,
    pg: &tokio_postgres::Client,
    embedder: &mut Embedder,
    source_sql: &str,
    table: &str,
    columns: &[&str],
    in_payload: usize,
    template: &str,
) -> Vec<String> {
    let parts = parse_template(template).unwrap();
    let mut diffs = Vec::new();
    let expected: Vec<(i32, Vec<Option<String>>)> = src
        .query(source_sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (1..r.len()).map(|i| r.get(i)).collect()))
        .collect();
    let select: Vec<String> = columns[..in_payload]
        .iter()
        .map(|c| format!("payload->>'{c}'"))
        .collect();
    let got: Vec<StoredRow> = pg
        .query(
            &format!(
                "SELECT id, text_hash, embedding, {} FROM {table} ORDER BY id",
                select.join(", ")
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let values = (3..r.len()).map(|i| r.get(i)).collect();
            (r.get(0), values, r.get(1), r.get(2))
        })
        .collect();
    let got_ids: Vec<i32> = got.iter().map(|g| g.0).collect();
    let want_ids: Vec<i32> = expected.iter().map(|e| e.0).collect();
    if got_ids != want_ids {
        diffs.push(format!("{table}: keys {got_ids:?} != source {want_ids:?}"));
        return diffs;
    }
    let mut texts = Vec::new();
    for ((id, want), (_, have, hash, vector)) in expected.iter().zip(&got) {
        // The source row's values as the template sees them (the source's columns after id).
        let row: Row =
            std::iter::once(("id", Value::Int32(*id)))
                .chain(
                    columns.iter().skip(1).zip(want.iter()).map(|(c, v)| {
                        (*c, v.clone().map_or(Value::Null, |s| Value::Text(s.into())))
                    }),
                )
                .collect();
        let expected_payload: Vec<Option<String>> = std::iter::once(Some(id.to_string()))
            .chain(want.iter().cloned())
            .take(in_payload)
            .collect();
        if *have != expected_payload {
            let which: Vec<&str> = columns
                .iter()
                .zip(have.iter().zip(&expected_payload))
                .filter(|(_, (h, w))| h != w)
                .map(|(c, _)| *c)
                .collect();
            diffs.push(format!("{table} id {id}: payload differs in {which:?}"));
        }
        let text = render(&parts, &row).unwrap();
        if *hash != Some(text_hash(&text) as i64) {
            diffs.push(format!(
                "{table} id {id}: text_hash is not the current text's"
            ));
        }
        match vector {
            None => diffs.push(format!("{table} id {id}: no embedding")),
            Some(v) => texts.push((*id, text, v.to_vec())),
        }
    }
    let fresh = embedder
        .embed(&texts.iter().map(|t| t.1.as_str()).collect::<Vec<_>>())
        .unwrap();
    for ((id, _, stored), fresh) in texts.iter().zip(fresh) {
        let cos = cosine(stored, &fresh);
        if cos < 0.9999 {
            diffs.push(format!(
                "{table} id {id}: vector is not the current text's (cos {cos:.4})"
            ));
        }
    }
    diffs
}

/// `tributary verify --config CONFIG ARGS…`: its exit code and its output (stdout, stderr).
pub fn verify(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .arg("verify")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}
