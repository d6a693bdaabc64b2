//! `tributary check`: can every configured service be reached with this configuration?
//!
//! Each probe runs concurrently under its own timeout and yields one line: what was probed and
//! `ok` with what it found, or the error, with every secret of the configuration redacted. Probes only read: they
//! create no slot, topic, table or object.

use std::time::Duration;

use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{Config, KafkaSourceConfig};
use crate::pg::{connect, error_text};
use crate::secret::{ConnString, Redactor};

/// One probe's outcome.
#[derive(Debug)]
pub struct Probe {
    pub service: &'static str,
    pub target: String,
    pub result: Result<String, String>,
}

/// Probes every service `config` names; `timeout` bounds each probe.
pub async fn run(config: &Config, timeout: Duration) -> Vec<Probe> {
    let mut probes: Vec<futures::future::BoxFuture<'_, Probe>> = Vec::new();
    if let Some(pg) = &config.sources.postgres {
        probes.push(Box::pin(probe(
            "postgres source",
            pg.url.redacted(),
            timeout,
            postgres_source(&pg.url),
        )));
    }
    if let Some(k) = &config.sources.kafka {
        let target = k
            .librdkafka_properties()
            .ok()
            .and_then(|p| p.get("bootstrap.servers").map(str::to_owned))
            .unwrap_or_default();
        probes.push(Box::pin(probe(
            "kafka source",
            target,
            timeout,
            kafka(k, timeout),
        )));
    }
    if let Some(e) = &config.embedding {
        probes.push(Box::pin(probe(
            "embedding model",
            e.model_dir.display().to_string(),
            timeout,
            model(e),
        )));
    }
    if let Some(d) = &config.sinks.delta {
        probes.push(Box::pin(probe(
            "delta sink",
            d.uri.clone(),
            timeout,
            object_store_list(&d.uri, &d.storage),
        )));
    }
    if let Some(p) = &config.sinks.pgvector {
        probes.push(Box::pin(probe(
            "pgvector sink",
            p.url.redacted(),
            timeout,
            pgvector(&p.url),
        )));
    }
    // librdkafka, object_store and PostgreSQL errors may quote configured values.
    let redactor = Redactor::for_config(config);
    let mut probes = futures::future::join_all(probes).await;
    for p in &mut probes {
        p.target = redactor.redact(&p.target).into_owned();
        p.result = match &p.result {
            Ok(detail) => Ok(redactor.redact(detail).into_owned()),
            Err(e) => Err(redactor.redact(e).into_owned()),
        };
    }
    probes
}

async fn probe(
    service: &'static str,
    target: String,
    timeout: Duration,
    fut: impl Future<Output = Result<String, String>>,
) -> Probe {
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    Probe {
        service,
        target,
        result,
    }
}

async fn postgres_source(url: &ConnString) -> Result<String, String> {
    let client = connect(url).await?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level'), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| error_text(&e))?;
    let column_err = |e: tokio_postgres::Error| error_text(&e);
    let (version, wal_level, can_replicate): (String, String, Option<bool>) = (
        row.try_get(0).map_err(column_err)?,
        row.try_get(1).map_err(column_err)?,
        row.try_get(2).map_err(column_err)?,
    );
    if wal_level != "logical" {
        return Err(format!(
            "wal_level is {wal_level:?}: set wal_level = logical in postgresql.conf and restart \
             the server"
        ));
    }
    if can_replicate != Some(true) {
        return Err(
            "the user lacks the REPLICATION attribute: ALTER ROLE … WITH REPLICATION".into(),
        );
    }
    Ok(format!(
        "PostgreSQL {version}, wal_level=logical, replication allowed, {}",
        tls_line(&client).await?
    ))
}

/// `TLS TLSv1.3 (TLS_AES_256_GCM_SHA384)` or `no TLS`, as the server sees this connection.
async fn tls_line(client: &tokio_postgres::Client) -> Result<String, String> {
    Ok(match crate::pg::tls_in_use(client).await {
        Ok(Some(tls)) => format!("TLS {tls}"),
        Ok(None) => "no TLS".to_owned(),
        Err(e) => return Err(format!("reading pg_stat_ssl: {}", error_text(&e))),
    })
}

async fn pgvector(url: &ConnString) -> Result<String, String> {
    let client = connect(url).await?;
    let row = client
        .query_opt(
            "SELECT default_version, installed_version FROM pg_available_extensions \
             WHERE name = 'vector'",
            &[],
        )
        .await
        .map_err(|e| error_text(&e))?;
    match row {
        None => {
            Err("the pgvector extension is not available on this server: install pgvector".into())
        }
        Some(row) => {
            let (available, installed): (String, Option<String>) = (row.get(0), row.get(1));
            let tls = tls_line(&client).await?;
            Ok(match installed {
                Some(v) => format!("pgvector {v} installed, {tls}"),
                None => format!("pgvector {available} available (created on first run), {tls}"),
            })
        }
    }
}

async fn kafka(k: &KafkaSourceConfig, timeout: Duration) -> Result<String, String> {
    let props = k.librdkafka_properties().map_err(|e| e.to_string())?;
    let topics: Vec<String> = k.topics.iter().map(|t| t.name.clone()).collect();
    tokio::task::spawn_blocking(move || {
        let (_, md) = kafka_metadata(&props, timeout)?;
        let mut found = Vec::new();
        for name in &topics {
            match md.topics().iter().find(|t| t.name() == name) {
                Some(t) if t.error().is_none() => {
                    found.push(format!("{name} ({} partitions)", t.partitions().len()))
                }
                _ => return Err(format!("topic {name:?} does not exist on the cluster")),
            }
        }
        Ok(format!(
            "{} broker(s); {}",
            md.brokers().len(),
            found.join(", ")
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A consumer for look-ups (no subscription, nothing committed) and the cluster's metadata,
/// fetched within `timeout` (less a margin, so a caller bounding the whole call by `timeout`
/// still gets the reason): a refused connection, a refused login or an untrusted certificate is
/// reported with librdkafka's reason, not as a time-out. Blocking.
pub(crate) fn kafka_metadata(
    props: &crate::secret::SecretMap,
    timeout: Duration,
) -> Result<(BaseConsumer<ProbeContext>, rdkafka::metadata::Metadata), String> {
    let redactor = crate::source::kafka::redactor(props);
    let mut cc = ClientConfig::new();
    for (key, value) in props.iter() {
        cc.set(key, value);
    }
    let consumer: BaseConsumer<ProbeContext> = cc
        .create_with_context(ProbeContext::default())
        .map_err(|e| redactor.redact(&e.to_string()).into_owned())?;
    // Asked in short rounds, so that a refused login or an untrusted certificate is reported at
    // once (and before the caller's own timeout) instead of as a time-out.
    let deadline = std::time::Instant::now() + timeout.saturating_sub(Duration::from_millis(750));
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match consumer.fetch_metadata(None, left.min(Duration::from_secs(1))) {
            Ok(md) => return Ok((consumer, md)),
            Err(e) => {
                use crate::source::kafka::login;
                // librdkafka's error says only "transport failure"; its log line says why.
                // Log lines come through the client's queue: serve what is queued.
                for _ in 0..20 {
                    if consumer.poll(Duration::from_millis(20)).is_none() {
                        break;
                    }
                }
                match consumer.context().failure.get() {
                    Some(reason) if login::is_login_failure(&reason) => {
                        return Err(login::login_failure(props, &reason, &redactor));
                    }
                    Some(reason) => {
                        return Err(login::connection_failure(props, &reason, &redactor));
                    }
                    None if left.is_zero() => {
                        return Err(format!("cannot fetch metadata: {e}"));
                    }
                    None => {}
                }
            }
        }
    }
}

/// The context of the Kafka probe: keeps why a broker connection failed.
#[derive(Default)]
pub(crate) struct ProbeContext {
    failure: crate::source::kafka::login::LastFailure,
}

impl rdkafka::ClientContext for ProbeContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.failure.record(level, fac, log_message);
        crate::source::kafka::login::forward_log(level, fac, log_message);
    }
}

impl rdkafka::consumer::ConsumerContext for ProbeContext {}

/// A plain consumer for metadata and offset look-ups (no subscription, nothing committed); its
/// creation error has the properties' secrets scrubbed (librdkafka quotes rejected values).
pub(crate) fn kafka_consumer(props: &crate::secret::SecretMap) -> Result<BaseConsumer, String> {
    let mut cc = ClientConfig::new();
    for (key, value) in props.iter() {
        cc.set(key, value);
    }
    cc.create().map_err(|e| {
        crate::source::kafka::redactor(props)
            .redact(&e.to_string())
            .into_owned()
    })
}

async fn model(config: &crate::config::EmbeddingConfig) -> Result<String, String> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let mut embedder = crate::enrich::Embedder::load(&config).map_err(|e| e.to_string())?;
        embedder.embed(&["check"])?;
        Ok(format!(
            "loaded, {} dimensions, {} intra-op thread(s)",
            embedder.dimension(),
            config.threads()
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn object_store_list(
    uri: &str,
    options: &crate::secret::SecretMap,
) -> Result<String, String> {
    let (store, prefix) = crate::storage::open(uri, options).map_err(|e| e.to_string())?;
    let mut listing = store.list(Some(&prefix));
    let mut n = 0usize;
    while let Some(item) = listing.next().await {
        item.map_err(|e| format!("cannot list: {e}"))?;
        n += 1;
        if n >= 1000 {
            break;
        }
    }
    Ok(match n {
        0 => "reachable, empty".to_owned(),
        1000 => "reachable, 1000+ objects".to_owned(),
        n => format!("reachable, {n} objects"),
    })
}
