//! Configuration errors name the key that is wrong; secrets never show in `Debug`.

use std::path::Path;

use tributary::config::{ChunkStore, Config, ConfigError};

const GOOD: &str = r#"
name = "orders-cdc"

[sources.postgres]
url = "postgres://app:${PG_PASSWORD}@db.internal:5432/shop"
publication = "tributary"
slot = "tributary_orders"
tables = ["public.orders", 'public."Order Items"']

[sources.kafka]
brokers = "${KAFKA_BROKERS:-127.0.0.1:59092}"
group_id = "tributary"
[[sources.kafka.topics]]
name = "orders"
format = "json"
key_columns = ["order_id"]
[sources.kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "PLAIN"
"sasl.username" = "ALICEKEY"
"sasl.password" = "${SASL_SECRET}"

[embedding]
model_dir = "/models/minilm"
[embedding.templates]
"public.orders" = "{customer} ordered {items}: {note}"
orders = "{note}"

[sinks.delta]
uri = "s3://lake/bronze"
[sinks.delta.storage]
aws_access_key_id = "AKIAEXAMPLE"
aws_secret_access_key = "${AWS_SECRET}"

[sinks.pgvector]
url = "host=vec.internal user=app password=${VEC_PASSWORD} dbname=vectors"
[sinks.pgvector.tables]
orders = "kafka_orders"
"#;

const SECRETS: [&str; 4] = [
    "pg-secret-1",
    "sasl-secret-2",
    "aws-secret-3",
    "vec-secret-4",
];

fn env(name: &str) -> Option<String> {
    match name {
        "PG_PASSWORD" => Some(SECRETS[0].into()),
        "SASL_SECRET" => Some(SECRETS[1].into()),
        "AWS_SECRET" => Some(SECRETS[2].into()),
        "VEC_PASSWORD" => Some(SECRETS[3].into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/tributary"), env)
}

/// Parses `GOOD` with one line replaced, and returns the error.
fn error_with(find: &str, replace: &str) -> ConfigError {
    assert!(GOOD.contains(find), "fixture lacks {find:?}");
    match parse(&GOOD.replacen(find, replace, 1)) {
        Ok(_) => panic!("replacing {find:?} with {replace:?} was accepted"),
        Err(e) => e,
    }
}

fn assert_key(err: &ConfigError, key: &str, needle: &str) {
    let text = err.to_string();
    assert_eq!(err.key(), Some(key), "wrong key in: {text}");
    assert!(text.starts_with(&format!("{key}: ")), "{text}");
    assert!(text.contains(needle), "{text:?} lacks {needle:?}");
}

#[test]
fn good_config_parses_with_interpolation_and_defaults() {
    let c = parse(GOOD).unwrap();
    let pg = c.sources.postgres.as_ref().unwrap();
    assert_eq!(
        pg.url.expose(),
        "postgres://app:pg-secret-1@db.internal:5432/shop"
    );
    let k = c.sources.kafka.as_ref().unwrap();
    assert_eq!(k.brokers.as_deref(), Some("127.0.0.1:59092"));
    let props = k.librdkafka_properties().unwrap();
    assert_eq!(props.get("sasl.password"), Some("sasl-secret-2"));
    assert_eq!(props.get("group.id"), Some("tributary"));
    assert_eq!(c.sinks.pgvector.as_ref().unwrap().schema, "public");
    assert_eq!(
        c.known_sources().unwrap(),
        vec!["public.orders", "public.Order Items", "orders"]
    );
}

#[test]
fn missing_key_is_named() {
    let e = error_with("slot = \"tributary_orders\"\n", "");
    assert_key(&e, "sources.postgres", "missing field `slot`");
}

#[test]
fn unknown_key_is_named() {
    let e = error_with(
        "group_id = \"tributary\"",
        "group_id = \"tributary\"\ngroupid = \"x\"",
    );
    assert_key(&e, "sources.kafka.groupid", "unknown field `groupid`");
    let e = error_with("name = \"orders-cdc\"", "name = \"orders-cdc\"\nnmae = 1");
    assert_key(&e, "nmae", "unknown field `nmae`");
}

#[test]
fn bad_uri_scheme_is_named() {
    let e = error_with("uri = \"s3://lake/bronze\"", "uri = \"ftp://lake/bronze\"");
    assert_key(&e, "sinks.delta.uri", "unsupported scheme \"ftp\"");
    let e = error_with("uri = \"s3://lake/bronze\"", "uri = \"s3:///no-bucket\"");
    assert_key(&e, "sinks.delta.uri", "names no bucket");
}

#[test]
fn unset_variable_without_default_is_named() {
    let e = error_with("${SASL_SECRET}", "${SASL_SECRET_TYPO}");
    assert_key(
        &e,
        "sources.kafka.properties.sasl.password",
        "SASL_SECRET_TYPO is not set",
    );
}

#[test]
fn wrong_type_is_named_without_echoing_the_value() {
    let e = error_with("tables = [", "tables = \"pg-secret-1\"\nx = [");
    // `x` comes after; the type error on `tables` is reported first.
    assert_key(&e, "sources.postgres.tables", "invalid type");
    assert!(!e.to_string().contains("pg-secret-1"), "{e}");
    let e = error_with("format = \"json\"", "format = \"csv\"");
    assert_key(
        &e,
        "sources.kafka.topics[0].format",
        "unknown variant `csv`",
    );
}

#[test]
fn value_level_problems_are_named() {
    let e = error_with("slot = \"tributary_orders\"", "slot = \"Orders-Slot\"");
    assert_key(
        &e,
        "sources.postgres.slot",
        "not a valid replication slot name",
    );
    let e = error_with("orders = \"{note}\"", "payments = \"{note}\"");
    assert_key(
        &e,
        "embedding.templates.\"payments\"",
        "no configured source",
    );
    let e = error_with("orders = \"{note}\"", "orders = \"{note\"");
    assert_key(&e, "embedding.templates.\"orders\"", "unclosed");
    let e = error_with("@db.internal:5432/shop", "@db.internal:notaport/shop");
    assert_key(
        &e,
        "sources.postgres.url",
        "invalid PostgreSQL connection string",
    );
    let e = error_with("brokers = \"${KAFKA_BROKERS:-127.0.0.1:59092}\"\n", "");
    assert_key(&e, "sources.kafka.brokers", "missing");
    let e = error_with(
        "group_id = \"tributary\"",
        "group_id = \"tributary\"\ndecode_tasks = 0",
    );
    assert_key(&e, "sources.kafka.decode_tasks", "greater than 0");
    let two = "group_id = \"tributary\"\ndecode_tasks = 2";
    let config = parse(&GOOD.replace("group_id = \"tributary\"", two)).unwrap();
    assert_eq!(config.sources.kafka.as_ref().unwrap().decode_tasks(), 2);
}

#[test]
fn syntax_errors_give_a_line_but_not_its_text() {
    let e = error_with(
        "aws_secret_access_key = \"${AWS_SECRET}\"",
        "aws_secret_access_key = \"aws-secret-3",
    );
    let text = e.to_string();
    assert!(text.contains("line 33"), "{text}");
    assert!(!text.contains("aws-secret-3"), "{text}");
}

#[test]
fn no_secret_appears_in_debug_output() {
    let c = parse(GOOD).unwrap();
    let debug = format!("{c:?} {c:#?}");
    for s in SECRETS {
        assert!(!debug.contains(s), "{s} leaked into Debug output");
    }
    // Non-secret values stay visible, so the output is still useful.
    assert!(debug.contains("db.internal"), "{debug}");
    assert!(debug.contains("ALICEKEY"), "{debug}");
    let props = c.sources.kafka.unwrap().librdkafka_properties().unwrap();
    assert!(!format!("{props:?}").contains(SECRETS[1]));
}

#[test]
fn client_properties_file_supplies_brokers_and_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("client.properties"),
        "bootstrap.servers=pkc-x.confluent.cloud:9092\nsecurity.protocol=SASL_SSL\n\
         sasl.mechanisms=PLAIN\nsasl.username=KEY\nsasl.password=file-secret-5\n",
    )
    .unwrap();
    let text = GOOD
        .replacen(
            "brokers = \"${KAFKA_BROKERS:-127.0.0.1:59092}\"",
            "client_properties = \"client.properties\"",
            1,
        )
        .replacen("\"sasl.password\" = \"${SASL_SECRET}\"", "", 1);
    let c = Config::parse(&text, dir.path(), env).unwrap();
    let k = c.sources.kafka.as_ref().unwrap();
    let props = k.librdkafka_properties().unwrap();
    assert_eq!(
        props.get("bootstrap.servers"),
        Some("pkc-x.confluent.cloud:9092")
    );
    assert_eq!(props.get("sasl.password"), Some("file-secret-5"));
    // Explicit properties override the file.
    assert_eq!(props.get("sasl.username"), Some("ALICEKEY"));
    assert!(!format!("{c:?} {props:?}").contains("file-secret-5"));

    let e = Config::parse(&text, Path::new("/nonexistent"), env).unwrap_err();
    assert_key(&e, "sources.kafka.client_properties", "cannot read");
}

#[test]
fn a_local_lake_path_is_resolved_against_the_config_folder() {
    let text = GOOD.replacen("uri = \"s3://lake/bronze\"", "uri = \"lake\"", 1);
    let c = parse(&text).unwrap();
    assert_eq!(c.sinks.delta.unwrap().uri, "/etc/tributary/lake");
}

#[test]
fn two_sources_writing_one_pgvector_table_are_refused() {
    let e = error_with("orders = \"kafka_orders\"", "");
    assert_key(
        &e,
        "sinks.pgvector.tables",
        "\"public.orders\" and \"orders\" would both write table \"orders\"",
    );
}

#[test]
fn every_shipped_connector_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Lay the files out as a user would: connectors/ beside kafka/client.properties (copied
    // from the example), in a scratch folder.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, kafka) = (tmp.path().join("connectors"), tmp.path().join("kafka"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&kafka).unwrap();
    std::fs::copy(
        root.join("kafka/client.properties.example"),
        kafka.join("client.properties"),
    )
    .unwrap();
    let env = |name: &str| {
        Some(match name {
            n if n.ends_with("_URL") => "postgres://u:p@h:5432/d".to_owned(),
            n if n.ends_with("_BROKERS") => "broker:9092".to_owned(),
            n if n.ends_with("_DIR") || n.ends_with("_LAKE") => "/tmp/x".to_owned(),
            n => format!("{}-value", n.to_lowercase()),
        })
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("connectors")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let result = Config::parse(&text, &dir, env);
            assert!(
                result.is_ok(),
                "{}: {}",
                path.display(),
                result.unwrap_err()
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} connector files found");
}

#[test]
fn one_dead_letter_destination_for_the_run() {
    // `[dead_letter]` with a relative path: resolved against the config's folder.
    let text = format!("{GOOD}\n[dead_letter]\npath = \"letters.jsonl\"\n");
    let config = Config::parse(&text, Path::new("/etc/tributary"), env).unwrap();
    let (key, d) = config.dead_letter_config().unwrap();
    assert_eq!(key, "dead_letter");
    assert_eq!(
        d.path.as_deref(),
        Some(Path::new("/etc/tributary/letters.jsonl"))
    );
    // Its older place still works, and says so.
    let text = GOOD.replace(
        "group_id = \"tributary\"",
        "group_id = \"tributary\"\ndead_letter = { topic = \"orders.dlq\" }",
    );
    let config = parse(&text).unwrap();
    let (key, d) = config.dead_letter_config().unwrap();
    assert_eq!(key, "sources.kafka.dead_letter");
    assert_eq!(d.topic.as_deref(), Some("orders.dlq"));
    // Nothing given: the Delta `_dlq` table is the default (no explicit destination).
    assert!(parse(GOOD).unwrap().dead_letter_config().is_none());
}

#[test]
fn dead_letter_mistakes_are_named() {
    let both = GOOD.replace(
        "group_id = \"tributary\"",
        "group_id = \"tributary\"\ndead_letter = { path = \"a.jsonl\" }",
    ) + "\n[dead_letter]\npath = \"b.jsonl\"\n";
    assert_key(&parse(&both).unwrap_err(), "dead_letter", "keep one");
    let two_kinds = format!("{GOOD}\n[dead_letter]\npath = \"a.jsonl\"\ntopic = \"t\"\n");
    assert_key(
        &parse(&two_kinds).unwrap_err(),
        "dead_letter",
        "exactly one",
    );
    let without_kafka = r#"
name = "n"
[sources.postgres]
url = "postgres://u@h/db"
publication = "p"
slot = "s"
tables = ["t"]
[sinks.delta]
uri = "/tmp/lake"
[dead_letter]
topic = "letters"
"#;
    assert_key(
        &parse(without_kafka).unwrap_err(),
        "dead_letter.topic",
        "needs [sources.kafka]",
    );
}

#[test]
fn chunking_mistakes_are_named() {
    let with = |chunking: &str| {
        GOOD.replacen(
            "orders = \"{note}\"\n",
            &format!("orders = \"{{note}}\"\n{chunking}"),
            1,
        )
    };
    let ok = parse(&with(
        "[embedding.chunking.orders]\nchunk_tokens = 128\nchunk_overlap = 16\n",
    ))
    .unwrap();
    let c = ok.embedding.as_ref().unwrap().chunking["orders"];
    assert_eq!(
        (c.chunk_tokens, c.chunk_overlap, c.store),
        (128, 16, ChunkStore::Rows)
    );
    let err = |chunking: &str| parse(&with(chunking)).expect_err(chunking);
    assert_key(
        &err("[embedding.chunking.orders]\nchunk_tokens = 300\n"),
        "embedding.chunking.\"orders\".chunk_tokens",
        "outside 8..=254",
    );
    assert_key(
        &err("[embedding.chunking.orders]\nchunk_tokens = 100\nchunk_overlap = 60\n"),
        "embedding.chunking.\"orders\".chunk_overlap",
        "more than half",
    );
    assert_key(
        &err("[embedding.chunking.payments]\nchunk_tokens = 100\n"),
        "embedding.chunking.\"payments\"",
        "no entry in embedding.templates",
    );
    let e = err("[embedding.chunking.orders]\nchunk_tokens = 100\nstore = \"all\"\n");
    assert!(e.to_string().contains("embedding.chunking"), "{e}");
}
