"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it.

The proxy needs both halves of the exchange:

* :class:`ScramServer` authenticates clients connecting *to* the proxy, against verifiers
  in PostgreSQL's own ``rolpassword`` format, so a secret copied from ``pg_authid`` works
  unchanged and the proxy never has to hold plaintext passwords.
* :class:`ScramClient` authenticates the proxy's own connections *to* the nodes, whose
  ``pg_hba.conf`` will usually demand ``scram-sha-256``.

PostgreSQL-specific behaviour, deliberately mirrored here:

* The user name inside ``client-first-message`` is ignored (libpq sends ``n=``): the
  role comes from the startup packet, because PostgreSQL role names need not be UTF-8.
* Passwords go through SASLprep as PostgreSQL's ``pg_saslprep`` does it, including its
  fallback: a password that SASLprep would reject is used as its raw UTF-8 bytes. That
  keeps the verifiers made here byte-identical to the ones ``CREATE ROLE`` stores.
* No channel binding (``SCRAM-SHA-256-PLUS``) yet; a client asking for it with ``p=`` is
  refused, and ``y`` (client could bind but thinks we cannot) is accepted because we
  never advertise ``-PLUS``.

Messages are the raw SASL payloads (bytes); the framing into ``AuthenticationSASL*`` /
``SASLInitialResponse`` / ``SASLResponse`` messages belongs to the protocol layer.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "ScramAuthFailed",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "ScramVerifier",
    "format_verifier",
    "make_verifier",
    "parse_verifier",
    "saslprep",
    "verifier_for",
]

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096  # PostgreSQL's scram_iterations default
SALT_LEN = 16  # PostgreSQL's SCRAM_DEFAULT_SALT_LEN
NONCE_LEN = 18  # raw bytes, as PostgreSQL and libpq use (SCRAM_RAW_NONCE_LEN)
KEY_LEN = hashlib.sha256().digest_size
_PREFIX = MECHANISM + "$"

# Per-process secret for the mock salts of unknown users (see ScramServer). Random per
# process, so salts are stable for one proxy but reveal nothing across restarts.
_MOCK_SECRET = secrets.token_bytes(32)


class ScramError(Exception):
    """Malformed or out-of-order SCRAM exchange; the proxy answers SQLSTATE 08P01."""


class ScramAuthFailed(ScramError):
    """Wrong password, unknown user or bad server signature; SQLSTATE 28P01."""


@dataclass(frozen=True)
class ScramVerifier:
    """What a server stores instead of the password (RFC 5802 section 3).

    The keys are kept out of ``repr`` so they don't end up in logs: StoredKey and
    ServerKey together are enough to impersonate the server.
    """

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


# --------------------------------------------------------------------------- primitives


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    """Strict base64 decode; any junk means a malformed message, never a silent skip."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ScramError(f"invalid base64 in {what}") from exc


_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points: prohibited for stored strings
)


def saslprep(password: str) -> bytes:
    """Prepare a password the way PostgreSQL's ``pg_saslprep`` does (RFC 4013).

    ASCII passes through untouched. Otherwise non-ASCII spaces become U+0020, the
    "commonly mapped to nothing" characters are dropped, the result is NFKC-normalised,
    and prohibited / unassigned code points or bad bidi make the whole thing fall back to
    the raw UTF-8 password, exactly like PostgreSQL (which checks the mapped string before
    normalisation). Matching PostgreSQL matters more than matching the RFC to the letter:
    a mismatch would make every such password fail against verifiers PostgreSQL made.
    """
    raw = password.encode("utf-8")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    if not mapped:
        return raw
    if any(table(ch) for ch in mapped for table in _PROHIBITED):
        return raw
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return raw
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


def _salted_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) from the password: the expensive PBKDF2 step."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


# The proxy opens many node connections with the same password, and a node's salt and
# iteration count never change for a role, so cache PBKDF2 results for the client side.
_cached_salted_keys = lru_cache(maxsize=64)(_salted_keys)


# --------------------------------------------------------------------------- verifiers


def make_verifier(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramVerifier:
    """Build a verifier for ``password``; identical to what PostgreSQL stores for the same salt."""
    if iterations < 1:
        raise ValueError("iterations must be positive")
    if salt is None:
        salt = secrets.token_bytes(SALT_LEN)
    client_key, server_key = _salted_keys(password, salt, iterations)
    return ScramVerifier(iterations, salt, _h(client_key), server_key)


def parse_verifier(text: str) -> ScramVerifier:
    """Parse ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (``pg_authid.rolpassword``).

    Raises ``ValueError`` (not ScramError: this is configuration, not the wire).
    """
    try:
        if not text.startswith(_PREFIX):
            raise ValueError("not a SCRAM-SHA-256 verifier")
        params, keys = text[len(_PREFIX) :].split("$")
        iter_text, salt_text = params.split(":")
        stored_text, server_text = keys.split(":")
        if not iter_text.isdigit():
            raise ValueError("bad iteration count")
        iterations = int(iter_text)
        salt = _unb64(salt_text, "salt")
        stored_key = _unb64(stored_text, "StoredKey")
        server_key = _unb64(server_text, "ServerKey")
    except (ValueError, ScramError) as exc:
        raise ValueError(f"malformed SCRAM-SHA-256 verifier: {exc}") from None
    if iterations < 1 or not salt or len(stored_key) != KEY_LEN or len(server_key) != KEY_LEN:
        raise ValueError("malformed SCRAM-SHA-256 verifier: bad iterations, salt or key length")
    return ScramVerifier(iterations, salt, stored_key, server_key)


def format_verifier(v: ScramVerifier) -> str:
    """The inverse of :func:`parse_verifier`, in PostgreSQL's exact text form."""
    return f"{_PREFIX}{v.iterations}:{_b64(v.salt)}${_b64(v.stored_key)}:{_b64(v.server_key)}"


def _looks_like_md5(secret: str) -> bool:
    return (
        len(secret) == 35
        and secret.startswith("md5")
        and all(c in "0123456789abcdef" for c in secret[3:])
    )


def verifier_for(secret: str) -> ScramVerifier:
    """Turn a configured secret into a verifier.

    Like PostgreSQL's ``get_password_type``: a string that parses as a SCRAM verifier is
    one; anything else is a plaintext password (hashed here with a fresh salt). An MD5
    hash (``md5`` + 32 hex digits) cannot be turned into a SCRAM verifier, and treating
    it as a plaintext password would silently lock the user out, so it is refused.
    """
    if secret.startswith(_PREFIX):
        try:
            return parse_verifier(secret)
        except ValueError:
            pass  # PostgreSQL also falls back to "plaintext" here
    if _looks_like_md5(secret):
        raise ValueError("MD5 password hashes cannot be used for SCRAM-SHA-256 authentication")
    return make_verifier(secret)


# --------------------------------------------------------------------------- message parsing


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScramError("SCRAM message is not valid UTF-8") from exc


def _attr(parts: list[str], i: int, name: str) -> str:
    """Value of the mandatory attribute ``name=`` at position ``i``."""
    if i >= len(parts) or not parts[i].startswith(name + "="):
        raise ScramError(f"malformed SCRAM message: expected attribute {name!r}")
    return parts[i][2:]


def _check_extensions(parts: list[str]) -> None:
    """Optional trailing extensions must at least look like ``x=value``."""
    for part in parts:
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha() or not part[0].isascii():
            raise ScramError("malformed SCRAM message: garbage after attributes")


def _valid_nonce(nonce: str) -> bool:
    """RFC 5802 'printable': ASCII 0x21-0x7E except ','."""
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(NONCE_LEN))


def _escape_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


# --------------------------------------------------------------------------- server


class ScramServer:
    """Server half of one SCRAM-SHA-256 exchange (one instance per authentication attempt).

    Only ``SCRAM-SHA-256`` is offered: channel binding (``-PLUS``) needs the TLS
    ``tls-server-end-point`` hash plumbed through from the connection and is not done yet.

    ``verifier=None`` means the role does not exist (or has no usable secret). The
    exchange then runs to the end with a mock verifier and fails at the proof check, so a
    client cannot tell "no such user" from "wrong password". Pass ``username`` to make the
    mock salt stable per name (as PostgreSQL does); a random salt per attempt would give
    unknown users away.

    ``nonce`` overrides the random server nonce; it exists for test vectors only.
    """

    MECHANISMS: tuple[str, ...] = (MECHANISM,)

    def __init__(
        self, verifier: ScramVerifier | None, *, username: str = "", nonce: str | None = None
    ) -> None:
        self._mock = verifier is None
        if verifier is None:
            mock_salt = _hmac(_MOCK_SECRET, username.encode("utf-8"))[:SALT_LEN]
            verifier = ScramVerifier(
                DEFAULT_ITERATIONS,
                mock_salt,
                secrets.token_bytes(KEY_LEN),
                secrets.token_bytes(KEY_LEN),
            )
        self._verifier = verifier
        if nonce is not None and not _valid_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._server_nonce = nonce if nonce is not None else _new_nonce()
        self._state = "first"
        self._gs2_header = ""
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        """Handle SASLInitialResponse; return the server-first-message.

        Format: ``gs2-cbind-flag "," [authzid] "," [reserved-mext ","] "n=" user ",r=" nonce``.
        """
        if self._state != "first":
            raise ScramError("unexpected SCRAM client-first-message")
        self._state = "failed"
        if mechanism not in self.MECHANISMS:
            raise ScramError(
                f"client selected an invalid SASL authentication mechanism: {mechanism!r}"
            )
        text = _decode(data)
        parts = text.split(",")
        if len(parts) < 4:
            raise ScramError("malformed SCRAM client-first-message")
        flag, authzid = parts[0], parts[1]
        if flag.startswith("p="):
            raise ScramError("channel binding (SCRAM-SHA-256-PLUS) is not supported")
        if flag not in ("n", "y"):
            raise ScramError("malformed SCRAM client-first-message: bad gs2-cbind-flag")
        if authzid:
            raise ScramError("client uses authorization identity, but it is not supported")
        if parts[2].startswith("m="):
            raise ScramError("client requires an unsupported SCRAM extension")
        _attr(parts, 2, "n")  # the user name is ignored: the role comes from the startup packet
        client_nonce = _attr(parts, 3, "r")
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed SCRAM client-first-message: invalid nonce")
        _check_extensions(parts[4:])

        self._gs2_header = f"{flag},,"
        self._client_first_bare = text[len(self._gs2_header) :]
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._state = "final"
        return self._server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes:
        """Check the client proof; return the server-final-message ``v=<ServerSignature>``.

        Format: ``"c=" base64(gs2-header) ",r=" nonce ["," extensions] ",p=" proof``.
        """
        if self._state != "final":
            raise ScramError("unexpected SCRAM client-final-message")
        self._state = "failed"
        text = _decode(data)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM client-final-message: missing proof")
        parts = without_proof.split(",")
        cbind = _unb64(_attr(parts, 0, "c"), "channel binding")
        if cbind != self._gs2_header.encode("ascii"):
            raise ScramError("SCRAM channel binding check failed")
        if _attr(parts, 1, "r") != self._nonce:
            raise ScramError("SCRAM nonce mismatch")
        _check_extensions(parts[2:])
        proof = _unb64(proof_b64, "client proof")
        if len(proof) != KEY_LEN:
            raise ScramError("malformed SCRAM client-final-message: invalid proof length")

        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        # Always do the comparison, even for the mock verifier, so timing stays uniform.
        ok = hmac.compare_digest(_h(client_key), v.stored_key)
        if not ok or self._mock:
            raise ScramAuthFailed("password authentication failed")
        self._state = "done"
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode("ascii")


# --------------------------------------------------------------------------- client


class ScramClient:
    """Client half of one SCRAM-SHA-256 exchange, for the proxy's connections to nodes.

    ``user`` is sent (escaped) in ``n=`` for RFC conformance; PostgreSQL ignores it and
    uses the startup packet's user. The gs2 flag is always ``n``: the proxy does not do
    channel binding towards nodes yet. ``nonce`` overrides the random client nonce for
    test vectors only.

    :meth:`server_first` runs PBKDF2 (cached per password/salt/iterations), which takes a
    few milliseconds the first time for the default 4096 iterations.
    """

    def __init__(self, user: str, password: str, *, nonce: str | None = None) -> None:
        if nonce is not None and not _valid_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._user = user
        self._password = password
        self._client_nonce = nonce if nonce is not None else _new_nonce()
        self._state = "first"
        self._client_first_bare = ""
        self._expected_server_signature = b""

    def client_first(self) -> bytes:
        """The client-first-message, to send in SASLInitialResponse."""
        if self._state != "first":
            raise ScramError("client-first-message already sent")
        self._client_first_bare = f"n={_escape_saslname(self._user)},r={self._client_nonce}"
        self._state = "server-first"
        return f"n,,{self._client_first_bare}".encode()

    def server_first(self, data: bytes) -> bytes:
        """Take AuthenticationSASLContinue's payload; return the client-final-message."""
        if self._state != "server-first":
            raise ScramError("unexpected SCRAM server-first-message")
        self._state = "failed"
        text = _decode(data)
        parts = text.split(",")
        if parts and parts[0].startswith("m="):
            raise ScramError("server requires an unsupported SCRAM extension")
        nonce = _attr(parts, 0, "r")
        salt = _unb64(_attr(parts, 1, "s"), "salt")
        iter_text = _attr(parts, 2, "i")
        _check_extensions(parts[3:])
        if not (nonce.startswith(self._client_nonce) and len(nonce) > len(self._client_nonce)):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        if not _valid_nonce(nonce):
            raise ScramError("malformed SCRAM server-first-message: invalid nonce")
        if not iter_text.isdigit() or int(iter_text) < 1 or not salt:
            raise ScramError("malformed SCRAM server-first-message: bad salt or iterations")

        client_key, server_key = _cached_salted_keys(self._password, salt, int(iter_text))
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        proof = _xor(client_key, _hmac(_h(client_key), auth_message))
        self._expected_server_signature = _hmac(server_key, auth_message)
        self._state = "server-final"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def server_final(self, data: bytes) -> None:
        """Verify AuthenticationSASLFinal's payload; proves the node knew our verifier."""
        if self._state != "server-final":
            raise ScramError("unexpected SCRAM server-final-message")
        self._state = "failed"
        text = _decode(data)
        if text.startswith("e="):
            raise ScramAuthFailed(f"server rejected authentication: {text[2:]}")
        parts = text.split(",")
        signature = _unb64(_attr(parts, 0, "v"), "server signature")
        _check_extensions(parts[1:])
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramAuthFailed("invalid SCRAM server signature")
        self._state = "done"
