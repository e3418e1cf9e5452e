"""The swarm's certificates: the founding node is its certificate authority.

Why certificates: the broker must know which node each connection belongs to, from
something a node cannot lend or forge. Every node holds an ECDSA P-256 key that never
leaves it and a certificate whose common name (CN) is its node name, signed by the
swarm's CA; the broker accepts only certificates of that CA, and its auth plugin binds
the MQTT user and client id to the CN. The broker's own certificate comes from the
same CA, with the broker's address in its subjectAltName, so a client that trusts only
that CA (pinned when it joined) talks to the real broker and no one else.

The CA key lives on the founding node only (``keys/ca.key``). A joining node makes its
own key and sends a certificate signing request (CSR); the founder's agent answers
with a certificate. ``cryptography`` is large (about 8 MB in a process), so this module
is imported lazily: by node tooling and by the founder's agent, never by other agents.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ipdc.errors import TrustError
from ipdc.private import write_private

CA_DAYS = 3650
NODE_DAYS = 1825
#: Certificates start a little in the past: another machine's clock may be behind ours.
CLOCK_SKEW = dt.timedelta(minutes=5)
#: CSRs and certificates larger than this are not read (they are a few hundred bytes).
MAX_PEM = 8192

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TrustError("the private key is not an ECDSA P-256 key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes | str) -> x509.Certificate:
    raw = pem.encode() if isinstance(pem, str) else pem
    if len(raw) > MAX_PEM:
        raise TrustError(f"a certificate of {len(raw)} bytes is too large")
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise TrustError(f"not a PEM certificate: {exc}") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise TrustError(f"the certificate has {len(names)} common names, not one")
    return str(names[0].value)


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as ``AB:CD:...``: what a user compares by eye."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def make_csr(key: PrivateKey) -> bytes:
    """A CSR proving that the sender holds ``key``. Its subject is not used: the founder
    names the node."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ipdc-node")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(pem: str) -> PublicKey:
    """The key of a CSR from the network, once its self-signature (proof that the sender
    holds the private key) checks out. TrustError otherwise."""
    if len(pem) > MAX_PEM:
        raise TrustError(f"a CSR of {len(pem)} characters is too large")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise TrustError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise TrustError("the CSR's signature does not match its key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TrustError("the CSR's key is not an ECDSA P-256 key")
    return key


def check_issued(cert: x509.Certificate, ca: x509.Certificate, key: PublicKey, name: str) -> None:
    """A certificate the founder sent us must be for our own key and the name it gave us,
    and signed by the CA the invite pinned."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TrustError("the certificate is not signed by the swarm's CA from the invite") from None
    if cert.public_key() != key:
        raise TrustError("the certificate is not for this node's key")
    if common_name(cert) != name:
        raise TrustError(f"the certificate names {common_name(cert)!r}, not {name!r}")


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not sign_certs, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs,
                         crl_sign=sign_certs, encipher_only=False, decipher_only=False)


def _san(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


@dataclass(frozen=True)
class Authority:
    """The swarm's CA: a self-signed ECDSA P-256 certificate and its key."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, label: str) -> Authority:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"IPDC swarm CA {label}")])
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now() - CLOCK_SKEW)
                .not_valid_after(now() + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(sign_certs=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> Authority:
        return cls(load_key(key_file.read_bytes()), load_cert(cert_file.read_bytes()))

    def save(self, cert_file: Path, key_file: Path) -> None:
        write_private(key_file, key_pem(self.key))
        cert_file.write_bytes(cert_pem(self.cert))

    def issue(self, cn: str, key: PublicKey, *, not_after: dt.datetime | None = None,
              server_addresses: list[str] | None = None) -> x509.Certificate:
        """A leaf certificate for ``key``: a client certificate named ``cn`` (a node or an
        enrollment identity), or with ``server_addresses`` the broker's server certificate."""
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_addresses else ExtendedKeyUsageOID.CLIENT_AUTH
        start = now() - CLOCK_SKEW
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject)
                   .public_key(key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(min(start, not_after - CLOCK_SKEW) if not_after else start)
                   .not_valid_after(not_after or now() + dt.timedelta(days=NODE_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(sign_certs=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if server_addresses:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(a) for a in server_addresses]), critical=False)
        return builder.sign(self.key, hashes.SHA256())
