"""Produces JSONL records to a Kafka topic with confluent-kafka's real Schema Registry serializers
(AvroSerializer / JSONSerializer / ProtobufSerializer), registering the schema under the topic's value subject, so the
framing and the registry protocol are those real producers use.

Usage: produce_registry.py --brokers B --registry URL --topic T --format avro|json|protobuf
                           --schema FILE --records FILE --key-field F [--user USER:PASSWORD]
Avro values are given as JSON and converted by the schema's top-level logical types: decimal from a
string, date from YYYY-MM-DD, timestamp-* from ISO 8601. A Protobuf schema is given as JSON,
{"package": P, "messages": [{"name": M, "fields": [{"name", "number", "type", "repeated"?,
"message"?}]}], "produce": M} (types: the scalar names, "enum:A,B", "message" naming a message
of the file), built into a FileDescriptorProto at run time (no protoc); the serializer registers
it as Confluent's Python client does (base64 of the descriptor) and frames each message with its
message indexes. Prints {"count": N, "id": schema id}.
"""
import argparse
import datetime
import decimal
import json
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.serialization import MessageField, SerializationContext


def logical(field_type):
    """The logical type of a field's type (through a nullable union)."""
    if isinstance(field_type, list):
        others = [t for t in field_type if t != "null"]
        return logical(others[0]) if len(others) == 1 else None
    if isinstance(field_type, dict):
        return field_type.get("logicalType")
    return None


def avro_value(schema, record):
    out = dict(record)
    for f in schema.get("fields", []):
        v = out.get(f["name"])
        if v is None:
            continue
        kind = logical(f["type"])
        if kind == "decimal":
            out[f["name"]] = decimal.Decimal(v)
        elif kind == "date":
            out[f["name"]] = datetime.date.fromisoformat(v)
        elif kind and kind.startswith("timestamp-"):
            out[f["name"]] = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
    return out


def protobuf_class(spec):
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=spec["package"] + ".proto", package=spec["package"],
                                             syntax="proto3")
    for m in spec["messages"]:
        msg = fdp.message_type.add(name=m["name"])
        for f in m["fields"]:
            field = msg.field.add(name=f["name"], number=f["number"],
                                  label=F.LABEL_REPEATED if f.get("repeated") else F.LABEL_OPTIONAL)
            ty = f["type"]
            if ty.startswith("enum:"):
                enum = msg.enum_type.add(name=f["name"].capitalize() + "Kind")
                for i, v in enumerate(ty[5:].split(",")):
                    enum.value.add(name=v, number=i)
                field.type = F.TYPE_ENUM
                field.type_name = f".{spec['package']}.{m['name']}.{enum.name}"
            elif ty == "message":
                field.type = F.TYPE_MESSAGE
                field.type_name = f".{spec['package']}.{f['message']}"
            else:
                field.type = getattr(F, "TYPE_" + ty.upper())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName(f"{spec['package']}.{spec['produce']}")
    return message_factory.GetMessageClass(desc)


def main():
    ap = argparse.ArgumentParser()
    for a in ("--brokers", "--registry", "--topic", "--format", "--schema", "--records", "--key-field"):
        ap.add_argument(a, required=True)
    ap.add_argument("--user")
    args = ap.parse_args()
    conf = {"url": args.registry}
    if args.user:
        conf["basic.auth.user.info"] = args.user
    client = SchemaRegistryClient(conf)
    text = open(args.schema).read()
    if args.format == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer

        parsed = json.loads(text)
        serializer = AvroSerializer(client, text, lambda r, _ctx: avro_value(parsed, r))
    elif args.format == "protobuf":
        from google.protobuf import json_format
        from confluent_kafka.schema_registry.protobuf import ProtobufSerializer

        cls = protobuf_class(json.loads(text))
        proto = ProtobufSerializer(cls, client, {"use.deprecated.format": False})
        serializer = lambda r, ctx: proto(json_format.ParseDict(r, cls()), ctx)
    else:
        from confluent_kafka.schema_registry.json_schema import JSONSerializer

        serializer = JSONSerializer(text, client)
    producer = Producer({"bootstrap.servers": args.brokers, "acks": "all", "linger.ms": 5})
    failures = []
    n = 0
    ctx = SerializationContext(args.topic, MessageField.VALUE)
    with open(args.records) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            value = serializer(record, ctx)
            producer.produce(args.topic, value=value, key=str(record[args.key_field]).encode(),
                             on_delivery=lambda err, _msg: err and failures.append(err))
            producer.poll(0)
            n += 1
    producer.flush(30)
    if failures:
        sys.exit(f"{len(failures)} messages failed: {failures[0]}")
    latest = client.get_latest_version(f"{args.topic}-value")
    print(json.dumps({"count": n, "id": latest.schema_id}))


if __name__ == "__main__":
    main()
