#!/usr/bin/env python3
"""A minimal file-backed Confluent Schema Registry for tests (no real one is installable here).

Implements the documented REST subset that Tributary and confluent-kafka's serializers use:
  GET  /schemas/ids/{id}                    the schema text (+ schemaType, references)
  GET  /schemas/ids/{id}/versions           [{subject, version}]
  GET  /subjects                            subject names
  GET  /subjects/{s}/versions               version numbers
  GET  /subjects/{s}/versions/{v|latest}    {subject, version, id, schema, schemaType}
  POST /subjects/{s}/versions               register (same text → same id, across subjects)
  POST /subjects/{s}                        look a schema up in a subject
  GET|PUT /config[/{s}]                     compatibility (stored, never enforced)
Errors are Confluent's JSON ({"error_code": 40403, "message": ...}). State is one JSON file,
rewritten atomically on every registration, so a restart keeps ids. Optional HTTP basic auth
(--user USER:PASSWORD) answers 401 without it, as Confluent Cloud does.

Usage: schema_registry.py --port 59081 --dir DIR [--user USER:PASSWORD]
"""

import argparse
import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class Store:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.state = {"schemas": [], "subjects": {}, "config": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.state = json.load(f)

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def schema(self, schema_id):
        for s in self.state["schemas"]:
            if s["id"] == schema_id:
                return s
        return None

    def register(self, subject, body):
        text, kind = body["schema"], body.get("schemaType", "AVRO")
        refs = body.get("references", [])
        with self.lock:
            found = next(
                (s for s in self.state["schemas"] if s["schema"] == text and s["schemaType"] == kind),
                None,
            )
            if found is None:
                found = {"id": len(self.state["schemas"]) + 1, "schema": text, "schemaType": kind, "references": refs}
                self.state["schemas"].append(found)
            versions = self.state["subjects"].setdefault(subject, [])
            if found["id"] not in versions:
                versions.append(found["id"])
            self.save()
            return self.version(subject, versions.index(found["id"]) + 1)

    def version(self, subject, version):
        ids = self.state["subjects"].get(subject)
        if not ids or version < 1 or version > len(ids):
            return None
        s = self.schema(ids[version - 1])
        return {"subject": subject, "version": version, "id": s["id"], "schema": s["schema"],
                "schemaType": s["schemaType"], "references": s["references"]}


def handler(store, user):
    expected = "Basic " + base64.b64encode(user.encode()).decode() if user else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            print("%s %s" % (self.address_string(), fmt % args), flush=True)

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, code, error_code, message):
            self.reply(code, {"error_code": error_code, "message": message})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def authorised(self):
            if expected and self.headers.get("Authorization") != expected:
                self.error(401, 40101, "Unauthorized")
                return False
            return True

        def route(self, method):
            if not self.authorised():
                return
            path = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/") if p]
            st = store.state
            if method == "GET" and len(path) == 3 and path[:2] == ["schemas", "ids"] and path[2].isdigit():
                s = store.schema(int(path[2]))
                if s is None:
                    return self.error(404, 40403, "Schema %s not found" % path[2])
                out = {"schema": s["schema"], "references": s["references"]}
                if s["schemaType"] != "AVRO":
                    out["schemaType"] = s["schemaType"]
                return self.reply(200, out)
            if method == "GET" and len(path) == 4 and path[:2] == ["schemas", "ids"] and path[3] == "versions":
                sid = int(path[2]) if path[2].isdigit() else -1
                return self.reply(200, [{"subject": sub, "version": ids.index(sid) + 1}
                                        for sub, ids in st["subjects"].items() if sid in ids])
            if method == "GET" and path == ["subjects"]:
                return self.reply(200, sorted(st["subjects"]))
            if len(path) >= 2 and path[0] == "subjects":
                subject = path[1]
                if method == "POST" and len(path) == 3 and path[2] == "versions":
                    return self.reply(200, store.register(subject, self.body()))
                if subject not in st["subjects"]:
                    return self.error(404, 40401, "Subject '%s' not found." % subject)
                if method == "POST" and len(path) == 2:
                    body = self.body()
                    kind = body.get("schemaType", "AVRO")
                    for v in range(1, len(st["subjects"][subject]) + 1):
                        found = store.version(subject, v)
                        if found["schema"] == body.get("schema") and found["schemaType"] == kind:
                            return self.reply(200, found)
                    return self.error(404, 40403, "Schema not found")
                if method == "GET" and len(path) == 3 and path[2] == "versions":
                    return self.reply(200, list(range(1, len(st["subjects"][subject]) + 1)))
                if method == "GET" and len(path) == 4 and path[2] == "versions":
                    v = len(st["subjects"][subject]) if path[3] in ("latest", "-1") else (
                        int(path[3]) if re.fullmatch(r"\d+", path[3]) else 0)
                    found = store.version(subject, v)
                    if found is None:
                        return self.error(404, 40402, "Version %s not found." % path[3])
                    return self.reply(200, found)
            if path and path[0] == "config" and len(path) <= 2:
                key = path[1] if len(path) == 2 else ""
                if method == "PUT":
                    body = self.body()
                    level = body.get("compatibility") or body.get("compatibilityLevel") or "BACKWARD"
                    with store.lock:
                        st["config"][key] = level
                        store.save()
                    return self.reply(200, {"compatibility": level})
                level = st["config"].get(key) or st["config"].get("") or "BACKWARD"
                return self.reply(200, {"compatibilityLevel": level})
            return self.error(404, 404, "HTTP 404 Not Found")

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def do_PUT(self):
            self.route("PUT")

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--user", help="USER:PASSWORD for HTTP basic auth")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    store = Store(os.path.join(args.dir, "registry.json"))
    server = ThreadingHTTPServer((args.host, args.port), handler(store, args.user))
    server.daemon_threads = True
    print("schema registry on http://%s:%d (%s)" % (args.host, args.port, args.dir), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
