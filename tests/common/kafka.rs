//! Kafka helpers for tests: fresh topics, producing, reading a group's committed offsets.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{env, unique};

pub async fn create_topic(partitions: i32) -> String {
    let topic = unique("orders");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .create()
        .unwrap();
    for r in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        r.unwrap();
    }
    topic
}

/// A producer to the services' broker.
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap()
}

/// Produces `(key, value)` messages; returns the offset after the last message per partition.
pub async fn produce(topic: &str, messages: &[(String, Vec<u8>)], partitions: i32) -> Vec<i64> {
    let producer = producer();
    let mut next = vec![0i64; partitions as usize];
    for (i, (key, value)) in messages.iter().enumerate() {
        let partition = (i as i32) % partitions;
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        next[d.partition as usize] = next[d.partition as usize].max(d.offset + 1);
    }
    next
}

/// The group's committed offset for each of `partitions` partitions of `topic` (`None`: never
/// committed).
pub fn committed(topic: &str, group: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", env("TRIBUTARY_KAFKA_BROKERS"))
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .collect()
}
