"""Certificates and keys for the test control plane (a CA, the API server's serving
certificate, the service-account signing key pair), made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

SERVER_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local")
SERVER_IPS = ("127.0.0.1", "10.96.0.1")  # the second: the `kubernetes` Service's cluster IP


@dataclass(frozen=True)
class PKI:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    sa_private: Path
    sa_public: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(days=7)}

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(**valid).subject_name(_name("visionr1-test-ca"))
          .issuer_name(_name("visionr1-test-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in SERVER_NAMES] + [x509.IPAddress(ipaddress.ip_address(i)) for i in SERVER_IPS]
    server = (x509.CertificateBuilder(**valid).subject_name(_name("kube-apiserver"))
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))

    # Service-account tokens are RS256 by default: an RSA key.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = PKI(directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key",
              directory / "sa.key", directory / "sa.pub")
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(_pem_key(ca_key))  # signs serving certs (Kueue's webhooks)
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(_pem_key(server_key))
    pki.sa_private.write_bytes(_pem_key(sa_key))
    pki.sa_public.write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for key_file in (pki.server_key, pki.sa_private, directory / "ca.key"):
        key_file.chmod(0o600)
    return pki


def write_serving_cert(pki_dir: Path, out_dir: Path, common_name: str, ips=("127.0.0.1",),
                       names=("localhost",)) -> tuple[Path, Path]:
    """``tls.crt`` and ``tls.key`` in ``out_dir``, signed by the CA in ``pki_dir``: a
    serving certificate for a webhook the API server calls on a loopback address."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca = x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder(not_valid_before=now - datetime.timedelta(minutes=5),
                                    not_valid_after=now + datetime.timedelta(days=7))
            .subject_name(_name(common_name)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, key_file = out_dir / "tls.crt", out_dir / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    return crt, key_file
