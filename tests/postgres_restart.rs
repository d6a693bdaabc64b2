//! A real PostgreSQL server restart under a streaming source (its own test binary: the restart
//! must not pull the server from under other tests, and cargo runs test binaries one at a time).
//! The source reconnects with backoff, resumes at the last flushed position, and every change is
//! delivered: no gap, and no position twice.

mod common;

use std::time::{Duration, Instant};

use tributary::config::PostgresSourceConfig;
use tributary::event::{Op, Value};
use tributary::secret::ConnString;
use tributary::source::postgres::PostgresSourceReader;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_stream_resumes_with_no_gap_and_no_duplicate() {
    let admin = common::pg_connect(&common::env("TRIBUTARY_PG_URL")).await;
    let db = common::unique("restart");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = common::pg_url_for_db(&db);
    common::pg_connect(&url)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let started_at = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT pg_postmaster_start_time()::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = started_at(common::pg_connect(&url).await).await;
    let slot = common::unique("slot");
    let cfg = PostgresSourceConfig::new(ConnString::new(url.clone()), "p", &slot, &["t"]);
    let mut src = PostgresSourceReader::connect(&cfg).await.unwrap();
    assert!(
        src.poll(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );

    // Writer: 1..=300 in single-row transactions, reconnecting across the restart.
    let writer = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut c = common::pg_connect(&url).await;
            let mut id = 1;
            while id <= 300 {
                match c.execute("INSERT INTO t VALUES ($1)", &[&id]).await {
                    Ok(_) => id += 1,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if let Ok((client, conn)) =
                            tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                        {
                            tokio::spawn(conn);
                            c = client;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut events = Vec::new();
    let mut restart = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while events.len() < 300 && Instant::now() < deadline {
        let got = src.poll(1000, Duration::from_millis(200)).await.unwrap();
        if let Some(last) = got.last() {
            src.ack(&last.position).await.unwrap();
        }
        events.extend(got);
        if restart.is_none() && events.len() >= 50 {
            // Restart while this loop keeps polling: a shutting-down server waits for its
            // logical walsenders' clients to confirm the end of the WAL.
            restart = Some(tokio::task::spawn_blocking(|| {
                std::process::Command::new(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services"),
                )
                .arg("restart-postgres")
                .status()
                .unwrap()
            }));
        }
    }
    writer.await.unwrap();
    let status = restart.expect("the server was restarted").await.unwrap();
    assert!(status.success(), "scripts/services restart-postgres failed");
    let ids: Vec<i32> = events
        .iter()
        .map(|e| {
            assert_eq!(e.op, Op::Insert);
            match e.key.get("id") {
                Some(Value::Int32(i)) => *i,
                other => panic!("unexpected key {other:?}"),
            }
        })
        .collect();
    assert_eq!(
        ids,
        (1..=300).collect::<Vec<_>>(),
        "every insert once, in order"
    );
    assert_ne!(
        before,
        started_at(common::pg_connect(&url).await).await,
        "the server restarted"
    );
    src.close().await;

    let admin = common::pg_connect(&common::env("TRIBUTARY_PG_URL")).await;
    common::drop_source_db(&admin, &db, &slot).await;
}
