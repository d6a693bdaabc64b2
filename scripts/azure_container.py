#!/usr/bin/env python3
"""Create (idempotently) or list blob containers on Azurite with a SharedKey-signed request.

Stdlib only (hmac, hashlib, base64, urllib), so scripts/services can call it before any venv exists.
Azurite serves path-style URLs, http://HOST:PORT/ACCOUNT/..., and signs the canonicalized resource
as /ACCOUNT + URL path, so the account name appears twice (/devstoreaccount1/devstoreaccount1/lake).

Usage:
  azure_container.py --endpoint http://127.0.0.1:59010/devstoreaccount1 create lake
  azure_container.py --endpoint http://127.0.0.1:59010/devstoreaccount1 list
Account and key default to Azurite's published development account (or AZURE_STORAGE_ACCOUNT_NAME /
AZURE_STORAGE_ACCOUNT_KEY). Exit status 0 on success (an existing container counts as success).
"""
import argparse
import base64
import hashlib
import hmac
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from email.utils import formatdate

# Azurite's well-known development account (published in the Azurite README; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-10-04"

# Headers in the order the SharedKey string-to-sign lists them (after the verb).
SIGNED_HEADERS = (
    "Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
    "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range",
)


def sign(method, url, headers, account, key):
    """Return the SharedKey Authorization header value for this request."""
    u = urllib.parse.urlsplit(url)
    lower = {k.lower(): v for k, v in headers.items()}
    parts = [method]
    for h in SIGNED_HEADERS:
        v = lower.get(h.lower(), "")
        if h == "Content-Length" and v == "0":
            v = ""  # since 2015-02-21 a zero length is signed as empty
        parts.append(v)
    canon_headers = "".join(
        f"{k}:{lower[k].strip()}\n" for k in sorted(k for k in lower if k.startswith("x-ms-"))
    )
    resource = f"/{account}{u.path or '/'}"
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    for name in sorted(query, key=str.lower):
        resource += f"\n{name.lower()}:{','.join(sorted(query[name]))}"
    to_sign = "\n".join(parts) + "\n" + canon_headers + resource
    digest = hmac.new(base64.b64decode(key), to_sign.encode("utf-8"), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(digest).decode()}"


def request(method, url, account, key, timeout=10):
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": API_VERSION}
    if method == "PUT":
        # Set explicitly: urllib would otherwise add an unsigned form Content-Type to a body.
        headers.update({"Content-Length": "0", "Content-Type": "application/octet-stream"})
    headers["Authorization"] = sign(method, url, headers, account, key)
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--endpoint", required=True, help="account URL, e.g. http://127.0.0.1:59010/devstoreaccount1")
    ap.add_argument("--account", default=os.environ.get("AZURE_STORAGE_ACCOUNT_NAME", DEV_ACCOUNT))
    ap.add_argument("--key", default=os.environ.get("AZURE_STORAGE_ACCOUNT_KEY", DEV_KEY))
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("create", help="create a container (existing is fine)").add_argument("container")
    sub.add_parser("list", help="print container names, one a line")
    args = ap.parse_args()
    base = args.endpoint.rstrip("/")

    if args.cmd == "create":
        status, body = request("PUT", f"{base}/{args.container}?restype=container", args.account, args.key)
        if status == 201:
            print(f"azure_container: created container {args.container}", file=sys.stderr)
        elif status == 409 and b"ContainerAlreadyExists" in body:
            pass
        else:
            sys.exit(f"error: PUT container {args.container}: HTTP {status}: {body.decode(errors='replace')}")
    else:
        status, body = request("GET", f"{base}/?comp=list", args.account, args.key)
        if status != 200:
            sys.exit(f"error: list containers: HTTP {status}: {body.decode(errors='replace')}")
        for name in ET.fromstring(body).iter("Name"):
            print(name.text)


if __name__ == "__main__":
    main()
