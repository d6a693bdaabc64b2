//! The local services that `scripts/services up` starts are real and do what Tributary needs.
//! Run through `scripts/test` (which starts them and exports their endpoints), or after
//! `eval "$(scripts/services env)"`.

mod common;

use std::time::Duration;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use common::{env, pg_connect, unique};

#[tokio::test]
async fn postgres_has_logical_wal_pgvector_and_pgoutput_slots() {
    let admin = pg_connect(&env("TRIBUTARY_PG_URL")).await;
    let wal_level: String = admin.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
    assert_eq!(wal_level, "logical");

    let db = unique("svc");
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = common::pg_url_for_db(&db);
    let client = pg_connect(&url).await;
    client
        .batch_execute(
            "CREATE EXTENSION vector; CREATE TABLE items (id int PRIMARY KEY, v vector(3));
             INSERT INTO items VALUES (1, '[1,0,0]'), (2, '[0,1,0]');",
        )
        .await
        .unwrap();
    let nearest: i32 = client
        .query_one(
            "SELECT id FROM items ORDER BY v <=> '[0.1,0.9,0]' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(nearest, 2);

    let slot = unique("slot");
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    let plugin: String = client
        .query_one(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plugin, "pgoutput");
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_message_produced_to_orders_is_consumed_back_by_a_group() {
    let brokers = env("TRIBUTARY_KAFKA_BROKERS");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let key = unique("order");
    let payload = format!(r#"{{"order_id":"{key}","note":"two lamps"}}"#);
    let delivery = producer
        .send(
            FutureRecord::to("orders").key(&key).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let (partition, offset) = (delivery.partition, delivery.offset);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&["orders"]).unwrap();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = consumer.recv().await.unwrap();
            if m.key() == Some(key.as_bytes()) {
                return (m.partition(), m.offset(), m.payload().unwrap().to_vec());
            }
        }
    })
    .await
    .expect("the produced message was not consumed within 30 s");
    assert_eq!(found, (partition, offset, payload.into_bytes()));
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .unwrap();
}

async fn object_round_trip(uri: &str) {
    let (store, prefix) = tributary::storage::open(uri, &Default::default()).unwrap();
    let path = prefix.clone().join("hello.txt");
    store
        .put(&path, PutPayload::from_static(b"bronze"))
        .await
        .unwrap();
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].location, path);
    let body = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], b"bronze");
    // Delta commits rely on create-if-absent being refused for an existing key.
    let again = store
        .put_opts(
            &path,
            PutPayload::from_static(b"other"),
            object_store::PutMode::Create.into(),
        )
        .await;
    assert!(
        matches!(again, Err(object_store::Error::AlreadyExists { .. })),
        "{again:?}"
    );
}

#[tokio::test]
async fn objects_round_trip_through_the_s3_server() {
    let uri = format!("s3://{}/{}", env("TRIBUTARY_S3_BUCKET"), unique("svc"));
    object_round_trip(&uri).await;
}

#[tokio::test]
async fn objects_round_trip_through_azurite_by_az_and_abfss() {
    let container = env("TRIBUTARY_AZURE_CONTAINER");
    object_round_trip(&format!("az://{container}/{}", unique("svc"))).await;
    object_round_trip(&format!(
        "abfss://{container}@devstoreaccount1.dfs.core.windows.net/{}",
        unique("svc")
    ))
    .await;
}

#[tokio::test]
async fn objects_round_trip_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    object_round_trip(&format!("file://{}", dir.path().display())).await;
}

#[test]
fn the_onnx_model_embeds_a_sentence_to_a_unit_384_vector() {
    let model_dir = std::path::PathBuf::from(env("TRIBUTARY_MODEL_DIR"));
    let environment = ort::init_from(env("ORT_DYLIB_PATH"))
        .unwrap()
        .build()
        .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let enc = tokenizer
        .encode("A customer ordered two lamps.", true)
        .unwrap();
    let n = enc.get_ids().len();
    let as_i64 = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
    let mut session = ort::session::Session::builder(&environment)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(model_dir.join("model.onnx"))
        .unwrap();
    let outputs = session
        .run(ort::inputs! {
            "input_ids" => ort::value::Tensor::from_array(([1, n], as_i64(enc.get_ids()))).unwrap(),
            "attention_mask" => ort::value::Tensor::from_array(([1, n], as_i64(enc.get_attention_mask()))).unwrap(),
            "token_type_ids" => ort::value::Tensor::from_array(([1, n], as_i64(enc.get_type_ids()))).unwrap(),
        })
        .unwrap();
    let (shape, hidden) = outputs["last_hidden_state"]
        .try_extract_tensor::<f32>()
        .unwrap();
    assert_eq!(&shape[..], &[1, n as i64, 384]);
    let mut pooled = vec![0f32; 384];
    for t in 0..n {
        for (p, h) in pooled.iter_mut().zip(&hidden[t * 384..(t + 1) * 384]) {
            *p += h / n as f32;
        }
    }
    let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt();
    let unit: Vec<f32> = pooled.iter().map(|x| x / norm).collect();
    assert_eq!(unit.len(), 384);
    let unit_norm = unit.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((unit_norm - 1.0).abs() < 1e-5, "{unit_norm}");
    assert!(norm > 0.1, "the model returned a degenerate vector");
}
