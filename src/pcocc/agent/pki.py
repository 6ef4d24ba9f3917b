"""The small PKI of a virtual cluster: one CA per cluster, certificates for its endpoints.

At launch pcocc creates a CA for the cluster (its key stays in the owner's private
state store), a server certificate for each VM's control endpoint and a client
certificate for the owner (CN = user name).  Both sides of a connection trust only
this CA, so a certificate from another cluster is worthless here.

EC P-256 keys: generating and signing one costs about a millisecond, where RSA
key generation costs tens to hundreds.  Keys are unencrypted PKCS#8 PEM: they are
protected by the permissions of the store that holds them, not by a password.
"""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 366  # longer than any job's time limit: a cluster's certificates must not expire while it runs
CLOCK_SKEW = datetime.timedelta(minutes=5)  # nodes' clocks are not exactly in step


def make_ca(name, *, days=VALIDITY_DAYS):
    """A self-signed CA named ``name``: returns (cert_pem, key_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _builder(subject, subject, key.public_key(), days)
        # path_length=0: the CA signs end certificates only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return _pem(builder.sign(key, hashes.SHA256()), key)


def issue(ca_cert_pem, ca_key_pem, common_name, *, server=False, ips=(), dns=(), days=VALIDITY_DAYS):
    """A certificate signed by the CA: returns (cert_pem, key_pem).

    A client certificate (the default) carries the user name as CN and may only
    authenticate a client; a server certificate may only authenticate a server
    and carries ``ips`` and ``dns`` as subject alternative names.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # TLS stacks check this: a client certificate cannot pose as a VM endpoint
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips] + [x509.DNSName(d) for d in dns]
    if names:  # an empty SAN extension is invalid
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _builder(subject, issuer, public_key, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(cert_sign):
    return x509.KeyUsage(
        digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, encipher_only=False, decipher_only=False,
    )


def _pem(cert, key):
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
