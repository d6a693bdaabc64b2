"""Validates docker-compose.yml where no Docker Compose is installed (scripts/test runs
`docker compose config -q` instead when it is): YAML parses, every depends_on names a service with a
valid condition, every bind-mounted file and build context exists, every service has an image or a
build, and host ports do not collide."""
import os
import sys

import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
doc = yaml.safe_load(open(os.path.join(root, "docker-compose.yml")))
services = doc.get("services") or {}
errors = []
ports = {}
for name, svc in services.items():
    if not ("image" in svc or "build" in svc):
        errors.append(f"services.{name}: neither image nor build")
    if "build" in svc:
        ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
        if not os.path.isfile(os.path.join(root, ctx, "Dockerfile")):
            errors.append(f"services.{name}.build: no Dockerfile in {ctx}")
    deps = svc.get("depends_on") or []
    for dep, spec in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
        if dep not in services:
            errors.append(f"services.{name}.depends_on: unknown service {dep!r}")
        cond = (spec or {}).get("condition", "service_started")
        if cond not in ("service_started", "service_healthy", "service_completed_successfully"):
            errors.append(f"services.{name}.depends_on.{dep}: bad condition {cond!r}")
        if cond == "service_healthy" and "healthcheck" not in services.get(dep, {}):
            errors.append(f"services.{name}.depends_on.{dep}: service_healthy but {dep} has no healthcheck")
    for vol in svc.get("volumes") or []:
        src = vol.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.join(root, src)):
                errors.append(f"services.{name}.volumes: {src} does not exist")
    for p in svc.get("ports") or []:
        host = str(p).split(":")[0]
        if host in ports:
            errors.append(f"services.{name}.ports: host port {host} also used by {ports[host]}")
        ports[host] = name
if errors:
    print("docker-compose.yml: " + "\n docker-compose.yml: ".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"docker-compose.yml: {len(services)} services consistent")
