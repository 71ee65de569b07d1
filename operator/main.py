"""`kiln-operator`: run the handlers with kopf.

The operator (kiln.operator; the folder has no __init__.py, so a repo root on sys.path never
shadows the standard library's `operator`): TorchModel → CompiledArtifacts, compile Jobs,
Deployments, Services. Layers (kept by .importlinter): operator glue (main → handlers, kopf)
→ operator I/O (k8s) → operator core (reconcile → children → naming; pure: spec in, desired
children and status out). It never imports torch.

Entry point: settings are parsed here (KILN_* environment), never at import.
KILN_WATCH_NAMESPACES=ns1,ns2 limits the operator to those namespaces (the
chart's namespaced mode); otherwise it watches the whole cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys

import kopf

from kiln.operator import handlers
from kiln.operator.k8s import Cluster
from kiln.operator.settings import OperatorSettings

# Read by main() besides OperatorSettings (the chart sets them).
RUN_ENV = {
    "KILN_WATCH_NAMESPACES": "Comma-separated namespaces to watch; empty: the whole cluster.",
    "KILN_STANDALONE": "'true': one replica, no peering (the chart sets it for replicaCount 1).",
    "KILN_PEERING_PRIORITY": "kopf peering priority; 0: random, so one of several replicas leads.",
    "KILN_LIVENESS_ENDPOINT": "Where /healthz listens (default http://0.0.0.0:8081/healthz).",
    "POD_ID": "kopf's peering identity (the chart: the pod's name).",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """No flags: settings come from the environment, which --help lists."""
    lines = [
        f"  {OperatorSettings.model_config.get('env_prefix', '')}{name.upper()}: {field.description} "
        f"(default {field.default!r})"
        for name, field in OperatorSettings.model_fields.items()
    ]
    lines += [f"  {name}: {text}" for name, text in RUN_ENV.items()]
    parser = argparse.ArgumentParser(
        prog="kiln-operator",
        description="Kiln's Kubernetes operator: TorchModel → compile Jobs, cached artifacts, serving pods.",
        epilog="environment:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not a line per timer tick
    settings = OperatorSettings()
    registry = kopf.OperatorRegistry()
    handlers.register(registry, settings)
    standalone = os.environ.get("KILN_STANDALONE", "") == "true"
    kopf_settings = kopf.OperatorSettings()
    handlers.configure(kopf_settings, standalone)
    namespaces = [n for n in os.environ.get("KILN_WATCH_NAMESPACES", "").split(",") if n]
    kopf.run(
        registry=registry,
        settings=kopf_settings,
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=standalone,
        memo=handlers.Kiln(settings, Cluster()),
        # Peers with equal priorities would all stay active; distinct ones elect the highest.
        priority=int(os.environ.get("KILN_PEERING_PRIORITY", "0")) or random.randint(1, 1_000_000),
        liveness_endpoint=os.environ.get("KILN_LIVENESS_ENDPOINT", "http://0.0.0.0:8081/healthz"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
