"""Keys and certificates of a deployment, made with ``cryptography`` alone: the coordinator's CA and TLS server
certificate (SANs: 127.0.0.1, localhost, ::1 and the names devices dial), and a device's node-authentication key
pair (ECDSA P-384, private key in OpenSSH format with mode 0600, public key as one OpenSSH line) — the formats
Flower 1.41 accepts (shared/DEPLOY.md)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def make_node_key(private_path: Path) -> Path:
    """A device's key pair: ``private_path`` (OpenSSH, 0600) and ``<private_path>.pub``; returns the .pub path.
    An existing key is kept (a device keeps its identity)."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = private_path.with_name(private_path.name + ".pub")
    if private_path.exists() and pub.exists():
        return pub
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private_path, key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b"\n")
    return pub


def check_public_key(path: Path) -> str:
    """The OpenSSH public key line in ``path`` if Flower will accept it (ECDSA on a NIST curve), else ValueError."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    line = path.read_bytes().strip()
    try:
        key = s.load_ssh_public_key(line)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an OpenSSH public key line ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                "secp521r1"):
        raise ValueError(f"{path}: Flower needs an ECDSA key on P-256/P-384/P-521 (make one with fedlora client "
                         "--init-key, or ssh-keygen -t ecdsa -b 384)")
    return line.decode()


def make_server_tls(folder: Path, hosts: list[str]) -> dict[str, Path]:
    """A CA (P-384) and a server certificate (P-256) for ``hosts`` plus 127.0.0.1, localhost and ::1, written to
    ``folder`` once (existing files are kept). Returns the paths: ca, cert, key, ca_key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key", "cert": folder / "server.pem",
             "key": folder / "server.key"}
    if all(p.exists() for p in paths.values()):
        return paths
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(["127.0.0.1", "::1", "localhost", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    folder.mkdir(parents=True, exist_ok=True)
    paths["ca"].write_bytes(ca.public_bytes(s.Encoding.PEM))
    _write_private(paths["ca_key"], ca_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    paths["cert"].write_bytes(cert.public_bytes(s.Encoding.PEM))
    _write_private(paths["key"], key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    return paths
