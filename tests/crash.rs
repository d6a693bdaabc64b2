//! Crash safety: `tributary run` is killed with SIGKILL at random moments (and, in builds with
//! the `failpoints` feature, aborts at the named points between sink commits and the
//! acknowledgement) while PostgreSQL takes a workload of inserts, updates, deletes and one large
//! transaction; it is restarted each time. At the end Bronze holds every change exactly once and
//! the pgvector table equals the source table.

mod common;

use std::time::{Duration, Instant};

use common::run::{Running, start, stop, wait_for};
use common::{env, pg_connect, unique};

const KILLS: usize = 24;

/// The workload, run while the connector is being killed: returns the number of row changes
/// (each statement's affected-row count), which is what Bronze must hold.
async fn workload(url: String) -> u64 {
    let c = pg_connect(&url).await;
    let mut changes = 0u64;
    let mut next_id = 1i32;
    let mut deleted = 0i32;
    for round in 0..220 {
        // 200 inserts in one transaction.
        changes += c
            .execute(
                "INSERT INTO items SELECT g, g % 97, 'note ' || g FROM generate_series($1::int, $2::int) g",
                &[&next_id, &(next_id + 199)],
            )
            .await
            .unwrap();
        next_id += 200;
        // 20 single-row updates and 5 deletes, each its own transaction.
        for j in 0..20 {
            let id = deleted + 1 + ((round * 37 + j * 11) % (next_id - deleted - 1));
            changes += c
                .execute(
                    "UPDATE items SET v = v + 1, note = note || '+' WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
        }
        for _ in 0..5 {
            deleted += 1;
            changes += c
                .execute("DELETE FROM items WHERE id = $1", &[&deleted])
                .await
                .unwrap();
        }
        if round == 110 {
            // The large transaction: 10,000 updates at once.
            changes += c
                .execute(
                    "UPDATE items SET note = note || ' (bulk)' WHERE id > $1 AND id <= $1 + 10000",
                    &[&deleted],
                )
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    changes
}

fn sigkill(mut run: Running) {
    run.0.kill().unwrap();
    run.0.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "crashsrc",
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text NOT NULL)",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("crash");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "crash-test"
[sources.postgres]
url = "{src_url}"
publication = "items_pub"
slot = "{slot}"
tables = ["items"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
batch_max_events = 2000
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();

    // First start: slot and (empty) snapshot, so that Bronze must hold every change of the
    // workload one by one (a snapshot taken mid-workload would fold some of them into rows).
    let run = start(&config);
    wait_for("the initial snapshot", async || {
        src.query_opt(
            "SELECT 1 FROM public.tributary_snapshot_state WHERE slot = $1 AND done",
            &[&slot],
        )
        .await
        .is_ok_and(|r| r.is_some())
    })
    .await;
    sigkill(run);

    let work = tokio::spawn(workload(src_url.clone()));
    // Deterministic pseudo-random kill moments (an LCG), 150–900 ms into each run; every third
    // run instead arms a crash point (when built with them).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    let mut aborts = 0;
    let started = Instant::now();
    while kills + aborts < KILLS || !work.is_finished() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(150 + (x >> 33) % 750);
        let point = (cfg!(feature = "failpoints") && (kills + aborts) % 3 == 2).then(|| {
            if (x >> 20).is_multiple_of(2) {
                "pipeline::after-sink-flush"
            } else {
                "pipeline::before-ack"
            }
        });
        let run = match point {
            Some(p) => {
                let run =
                    common::run::start_with_env(&config, &[("FAILPOINTS", &format!("{p}=return"))]);
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut run = run;
                while run.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if run.0.try_wait().unwrap().is_some() {
                    aborts += 1;
                    continue;
                }
                // Nothing reached the point (no changes pending): kill it instead.
                run
            }
            None => {
                let run = start(&config);
                tokio::time::sleep(after).await;
                run
            }
        };
        sigkill(run);
        kills += 1;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "crash loop took too long"
        );
    }
    let changes = work.await.unwrap();
    assert!(
        changes >= 50_000,
        "the workload is at least 50,000 changes ({changes})"
    );
    assert!(kills + aborts >= KILLS);

    // A last clean run catches up.
    let run = start(&config);
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"items\"");
    let source_rows: i64 = src
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    wait_for("pgvector to catch up", async || {
        pg.query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0) == source_rows)
            .unwrap_or(false)
            && pg
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE payload->>'note' LIKE '%(bulk)%'"),
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
    })
    .await;
    // Let the stream settle (the last changes may trail the counts above), then stop cleanly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    // pgvector equals the source.
    let expected: Vec<(i32, i32, String)> = src
        .query("SELECT id, v, note FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let got: Vec<(i32, i32, String)> = pg
        .query(
            &format!("SELECT id, (payload->>'v')::int, payload->>'note' FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "pgvector differs from the source after {kills} kills"
    );

    // Bronze: every change exactly once — as many rows as the workload changed, no position twice.
    let (rows, distinct) = common::bronze_positions(&dir.path().join("lake").join("public.items"));
    assert_eq!(
        (rows, distinct),
        (changes, changes),
        "Bronze must hold each of the {changes} changes once ({kills} kills, {aborts} crash points)"
    );

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}

#[cfg(feature = "failpoints")]
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_slows_the_source_and_memory_stays_bounded() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "slowsrc",
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, note text NOT NULL)",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("slow");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "slow-sink-test"
[sources.postgres]
url = "{src_url}"
publication = "items_pub"
slot = "{slot}"
tables = ["items"]
max_tx_memory_mb = 16
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_events = 1000
channel_capacity = 1000
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    // Every batch takes at least 250 ms in the sinks.
    let run = common::run::start_with_env(
        &config,
        &[("FAILPOINTS", "pipeline::before-ack=sleep(250)")],
    );
    let pid = run.0.id();
    wait_for("the initial snapshot", async || {
        src.query_opt(
            "SELECT 1 FROM public.tributary_snapshot_state WHERE slot = $1 AND done",
            &[&slot],
        )
        .await
        .is_ok_and(|r| r.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_kib(pid);
    // 400,000 changes with long notes (~200 MB of row data) arrive much faster than the sink
    // (which takes 250 ms per 1,000-event batch).
    src.batch_execute(
        "INSERT INTO items SELECT g, g, repeat('x', 500) || g FROM generate_series(1, 400000) g",
    )
    .await
    .unwrap();
    let mut peak = baseline;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_kib(pid));
    }
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let applied: i64 = pg
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".\"items\""), &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    drop(run);
    eprintln!(
        "slow sink: {applied} of 400000 applied after 10 s; RSS baseline {} MiB, peak {} MiB",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        applied < 100_000,
        "the sink is throttled: most changes must still wait in the WAL ({applied} applied)"
    );
    assert!(
        // Buffering the backlog would take well over 300 MiB (400,000 events of ~0.9 KiB);
        // bounded, the growth is the batches in flight, the transaction buffer (16 MiB) and the
        // allocator's caches — measured ≈ 60 MiB with glibc malloc and ≈ 170 MiB with mimalloc,
        // the same with 150,000 waiting changes as with 400,000.
        peak - baseline < 256 * 1024,
        "memory must stay bounded while 400,000 changes wait: RSS grew {} MiB (baseline {} MiB)",
        (peak - baseline) / 1024,
        baseline / 1024
    );

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}

/// Waits (up to 60 s) for a run to end by itself; its exit code and log.
#[cfg(feature = "failpoints")]
async fn wait_exit(mut run: Running, config: &std::path::Path) -> (Option<i32>, String) {
    let started = Instant::now();
    while run.0.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = run.0.try_wait().unwrap();
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
    assert!(status.is_some(), "the run must stop by itself: {log}");
    (status.and_then(|s| s.code()), log)
}

/// A stage that panics (the enrichment's model, a sink) stops the run with a non-zero exit and a
/// log line naming it; nothing it had in flight was acknowledged, so restarts deliver it again
/// and Bronze and pgvector end up exactly once.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stage_fails_the_run_and_a_restart_is_exact() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "panicsrc",
        "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
         INSERT INTO items SELECT g, 'note ' || g FROM generate_series(1, 100) g;",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("panic");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "panic-test"
[sources.postgres]
url = "{src_url}"
publication = "items_pub"
slot = "{slot}"
tables = ["items"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"public.items" = "{{note}}"
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 200
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_events = 10
batch_max_wait_ms = 20
[telemetry]
listen = ""
"#,
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"items\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    // A clean first run takes the snapshot.
    let run = start(&config);
    wait_for("the snapshot in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == 100
    })
    .await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    // 60 changes wait in the slot, one transaction each.
    for id in 101..=160 {
        src.execute(
            "INSERT INTO items VALUES ($1, $2)",
            &[&id, &format!("note {id}")],
        )
        .await
        .unwrap();
    }
    // The model panics on its second batch (the 60 changes make two).
    let run = common::run::start_with_env(&config, &[("FAILPOINTS", "enrich::embed=1*off->panic")]);
    let (code, log) = wait_exit(run, &config).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("enrich") && l.contains("panicked")),
        "a log line names the stage: {log}"
    );
    // The pgvector sink panics on its first write (what the model did not embed is left).
    let run = common::run::start_with_env(&config, &[("FAILPOINTS", "pgvector::write=panic")]);
    let (code, log) = wait_exit(run, &config).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("sinks.pgvector") && l.contains("panicked")),
        "a log line names the sink: {log}"
    );

    // A clean restart catches up: pgvector equals the source, Bronze holds each change once.
    let run = start(&config);
    wait_for("pgvector to catch up", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == 160
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    let expected: Vec<(i32, String)> = src
        .query("SELECT id, note FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got: Vec<(i32, String)> = pg
        .query(
            &format!("SELECT id, payload->>'note' FROM {table} ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, expected);
    let bronze = dir.path().join("lake").join("public.items");
    assert_eq!(common::bronze_positions(&bronze), (160, 160));

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}

/// The process dies after every sink committed the whole snapshot but before the source noted
/// the table done (the acknowledgement is lost): the restart finds the snapshot durable in the
/// sinks and does not take it again, so Bronze holds each row once and the change made in
/// between follows it.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_durable_in_every_sink_is_not_taken_again_after_a_crash() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "snapdone",
        "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
         INSERT INTO items SELECT g, 'note ' || g FROM generate_series(1, 500) g;",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("snapdone");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "snapshot-done-test"
[sources.postgres]
url = "{src_url}"
publication = "items_pub"
slot = "{slot}"
tables = ["items"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 200
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let state = async || {
        src.query_one(
            "SELECT epoch, done FROM public.tributary_snapshot_state WHERE slot = $1",
            &[&slot],
        )
        .await
        .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
        .unwrap()
    };
    let bronze = dir.path().join("lake").join("public.items");
    let run = common::run::start_with_env(
        &config,
        &[("FAILPOINTS", "postgres::before-snapshot-done=return")],
    );
    let (code, log) = wait_exit(run, &config).await;
    assert_ne!(code, Some(0), "the run dies at the crash point: {log}");
    assert_eq!(
        state().await,
        (1, false),
        "the crash came before the table was noted done"
    );
    assert_eq!(common::bronze_positions(&bronze), (500, 500));

    src.execute("UPDATE items SET note = 'changed' WHERE id = 7", &[])
        .await
        .unwrap();
    let run = start(&config);
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    wait_for("the change in pgvector", async || {
        pg.query_opt(
            &format!(
                "SELECT 1 FROM \"{schema}\".\"items\" WHERE id = 7 AND payload->>'note' = 'changed'"
            ),
            &[],
        )
        .await
        .is_ok_and(|r| r.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        state().await,
        (1, true),
        "the snapshot is not taken again: {log}"
    );
    assert_eq!(
        common::bronze_positions(&bronze),
        (501, 501),
        "Bronze holds the snapshot once and the change after it"
    );
    let rows: i64 = pg
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".\"items\""), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 500);

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}

/// The process dies right after creating the slot, before the snapshot's plan has its LSN: the
/// restart takes the snapshot anyway (from a new exported snapshot, which holds the change made
/// in between), so no row is missing and none is doubled.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_the_slot_was_created_still_takes_the_snapshot() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let (dbname, src_url, src) = common::create_source_db(
        &admin,
        "slotplan",
        "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
         INSERT INTO items SELECT g, 'note ' || g FROM generate_series(1, 300) g;",
    )
    .await;
    let slot = unique("slot");
    let schema = unique("slotplan");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "slot-plan-test"
[sources.postgres]
url = "{src_url}"
publication = "items_pub"
slot = "{slot}"
tables = ["items"]
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 200
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 50
[telemetry]
listen = ""
"#,
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let run = common::run::start_with_env(
        &config,
        &[("FAILPOINTS", "postgres::slot-created-before-plan=return")],
    );
    let (code, log) = wait_exit(run, &config).await;
    assert_ne!(code, Some(0), "the run dies at the crash point: {log}");
    let slot_exists = admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some();
    assert!(slot_exists, "the slot was created before the crash");
    src.execute("UPDATE items SET note = 'changed' WHERE id = 7", &[])
        .await
        .unwrap();
    let run = start(&config);
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    wait_for("the snapshot in pgvector", async || {
        pg.query_one(
            &format!(
                "SELECT count(*) = 300 AND bool_or(id = 7 AND payload->>'note' = 'changed')
                   FROM \"{schema}\".\"items\""
            ),
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, Option<bool>>(0) == Some(true))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");
    let bronze = dir.path().join("lake").join("public.items");
    assert_eq!(
        common::bronze_positions(&bronze),
        (300, 300),
        "Bronze holds each row once"
    );
    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}

/// The TOAST workload, run while the connector is being killed: notes updated while the TOASTed
/// column stays untouched, the TOASTed column updated and then the note in the next transaction,
/// key moves, inserts and deletes, each in its own transaction. Returns the row changes.
async fn toast_workload(url: String, seeded: i32) -> u64 {
    let c = pg_connect(&url).await;
    let mut live: Vec<i32> = (1..=seeded).collect();
    let mut next_id = seeded + 1;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut pick = |n: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize % n
    };
    let mut changes = 0u64;
    for round in 0..60 {
        for _ in 0..3 {
            changes += c
                .execute(
                    "INSERT INTO orders VALUES ($1::int, 'Customer ' || $1::int, 'note ' || $1::int, $2)",
                    &[&next_id, &common::vectors::big(next_id, 0)],
                )
                .await
                .unwrap();
            live.push(next_id);
            next_id += 1;
        }
        for j in 0..3 {
            let id = live[pick(live.len())];
            changes += c
                .execute(
                    "UPDATE orders SET note = note || $2 WHERE id = $1",
                    &[&id, &format!(" +{round}.{j}")],
                )
                .await
                .unwrap();
        }
        let id = live[pick(live.len())];
        changes += c
            .execute(
                "UPDATE orders SET big = $2 WHERE id = $1",
                &[&id, &common::vectors::big(id, round + 1)],
            )
            .await
            .unwrap();
        changes += c
            .execute(
                "UPDATE orders SET note = note || ' (big changed)' WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let i = pick(live.len());
        let moved = live[i] + 100_000;
        changes += c
            .execute(
                "UPDATE orders SET id = $2 WHERE id = $1",
                &[&live[i], &moved],
            )
            .await
            .unwrap();
        live[i] = moved;
        let gone = live.swap_remove(pick(live.len()));
        changes += c
            .execute("DELETE FROM orders WHERE id = $1", &[&gone])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    changes
}

/// SIGKILLed at random moments while a table with a TOASTed template column takes updates,
/// key moves and deletes: afterwards every pgvector row equals its source row, carries the hash
/// of its current text and that text's vector, and Bronze holds every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_toasted_template_column_and_key_moves_keeps_vectors_exact() {
    const SEEDED: i32 = 60;
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let mut seed = String::from(
        "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, note text NOT NULL,
                              big text NOT NULL);
         ALTER TABLE orders ALTER COLUMN big SET STORAGE EXTERNAL;",
    );
    for id in 1..=SEEDED {
        seed.push_str(&format!(
            "INSERT INTO orders VALUES ({id}, 'Customer {id}', 'note {id}', '{}');",
            common::vectors::big(id, 0)
        ));
    }
    let (dbname, src_url, src) = common::create_source_db(&admin, "crashtoast", &seed).await;
    let slot = unique("slot");
    let schema = unique("crasht");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let template = "{customer}: {note} | {big}";
    std::fs::write(
        &config,
        format!(
            r#"
name = "crash-toast-test"
[sources.postgres]
url = "{src_url}"
publication = "orders_pub"
slot = "{slot}"
tables = ["orders"]
[embedding]
model_dir = "{model}"
[embedding.templates]
"public.orders" = "{template}"
[sinks.delta]
uri = "{lake}"
flush_interval_ms = 300
[sinks.pgvector]
url = "{pg}"
schema = "{schema}"
[pipeline]
batch_max_wait_ms = 100
[telemetry]
listen = ""
"#,
            model = env("TRIBUTARY_MODEL_DIR"),
            pg = env("TRIBUTARY_PG_URL"),
            lake = dir.path().join("lake").display(),
        ),
    )
    .unwrap();
    let pg = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let table = format!("\"{schema}\".\"orders\"");
    let count = |sql: String| {
        let pg = &pg;
        async move {
            pg.query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };

    // The snapshot first, durably (so that Bronze must hold each later change as a row of its
    // own): pgvector holding it is not enough, the kill may land before Delta's commit.
    let run = start(&config);
    wait_for("the snapshot in pgvector", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE embedding IS NOT NULL"
        ))
        .await
            == i64::from(SEEDED)
    })
    .await;
    wait_for("the snapshot durable", async || {
        src.query_opt(
            "SELECT 1 FROM public.tributary_snapshot_state WHERE slot = $1 AND done",
            &[&slot],
        )
        .await
        .is_ok_and(|r| r.is_some())
    })
    .await;
    sigkill(run);

    let work = tokio::spawn(toast_workload(src_url.clone(), SEEDED));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    let started = Instant::now();
    while kills < KILLS || !work.is_finished() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Long enough for the model to load and batches to land, short enough to interrupt.
        let after = Duration::from_millis(1_000 + (x >> 33) % 2_500);
        let run = start(&config);
        tokio::time::sleep(after).await;
        sigkill(run);
        kills += 1;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "crash loop took too long"
        );
    }
    let changes = work.await.unwrap();

    // A last clean run catches up: a marker row written after everything else arrives last.
    src.execute(
        "INSERT INTO orders VALUES (-1, 'marker', 'the end', $1)",
        &[&common::vectors::big(-1, 0)],
    )
    .await
    .unwrap();
    let run = start(&config);
    wait_for("pgvector to catch up", async || {
        count(format!(
            "SELECT count(*) FROM {table} WHERE id = -1 AND embedding IS NOT NULL"
        ))
        .await
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, log) = stop(run, &config);
    assert_eq!(code, 0, "{log}");

    let mut embedder = tributary::enrich::Embedder::load(
        &tributary::config::EmbeddingConfig::for_model(env("TRIBUTARY_MODEL_DIR").into()),
    )
    .unwrap();
    let diffs = common::vectors::divergence(
        &src,
        &pg,
        &mut embedder,
        "SELECT id, customer, note, big FROM orders ORDER BY id",
        &table,
        &["id", "customer", "note", "big"],
        4,
        template,
    )
    .await;
    assert!(
        diffs.is_empty(),
        "pgvector differs from the source after {kills} kills:\n{}",
        diffs.join("\n")
    );
    let (code, out) = common::vectors::verify(&config, &["--all-vectors"]);
    assert_eq!(code, 0, "tributary verify after {kills} kills:\n{out}");
    // Bronze: the snapshot, every change and the marker, each exactly once.
    let expected = u64::try_from(SEEDED).unwrap() + changes + 1;
    let (rows, distinct) = common::bronze_positions(&dir.path().join("lake").join("public.orders"));
    assert_eq!(
        (rows, distinct),
        (expected, expected),
        "Bronze must hold each change once ({kills} kills)"
    );

    drop(src);
    common::drop_source_db(&admin, &dbname, &slot).await;
}
