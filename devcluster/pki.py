"""Certificates and keys for the local control plane, made with the openssl CLI.

A CA, the API server's serving certificate (localhost, 127.0.0.1 and the
kubernetes service names), and the service-account signing key pair.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")


@dataclass(frozen=True)
class Pki:
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    sa_key: Path
    sa_pub: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(folder: Path, service_ip: str) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    pki = Pki(*(folder / n for n in ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")))
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=kiln-devcluster-ca",
        "-keyout",
        str(pki.ca_key),
        "-out",
        str(pki.ca_crt),
    )
    csr = folder / "apiserver.csr"
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        str(pki.server_key),
        "-out",
        str(csr),
    )
    ext = folder / "apiserver.ext"
    names = ",".join([f"DNS:{n}" for n in ("localhost", *SERVICE_NAMES)] + ["IP:127.0.0.1", f"IP:{service_ip}"])
    ext.write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.ca_crt),
        "-CAkey",
        str(pki.ca_key),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        str(ext),
        "-out",
        str(pki.server_crt),
    )
    _openssl("genrsa", "-out", str(pki.sa_key), "2048")
    _openssl("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    return pki
