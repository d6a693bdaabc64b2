"""Produces a JSONL file to a Kafka topic, one message per line, keyed by a field of each object.
Uses the confluent-kafka client from the services venv (its librdkafka works against the local
tansu broker). Usage: produce_jsonl.py BROKERS TOPIC FILE KEY_FIELD"""
import json
import sys

from confluent_kafka import Producer

brokers, topic, path, key_field = sys.argv[1:5]
producer = Producer({"bootstrap.servers": brokers, "acks": "all", "linger.ms": 5})
failures = []
n = 0
with open(path) as f:
    for line in f:
        line = line.strip()
        if not line:
            continue
        key = str(json.loads(line)[key_field])
        producer.produce(topic, value=line.encode(), key=key.encode(),
                         on_delivery=lambda err, _msg: err and failures.append(err))
        producer.poll(0)
        n += 1
producer.flush(30)
if failures:
    sys.exit(f"{len(failures)} messages failed: {failures[0]}")
print(n)
