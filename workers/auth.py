"""Token checks and channel permissions. Pure: no sockets, no logging, never prints a token.

`TokenVerifier.verify(token, now)` returns `Claims` or raises `AuthFailure` whose `kind` is
what the client is told ("missing", "invalid", "expired") and whose `detail` is for the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from tidings.config import Config

SUBJECT = re.compile(r"[A-Za-z0-9_\-.@:]{1,128}")  # sub becomes the channel user:<sub>
MAX_PATTERNS = 256
MAX_PATTERN_BYTES = 256
# Reconnect storms (a worker restart, a network blip) bring back the very same tokens: remember
# the claims of recent tokens, keyed by the whole token string, to skip even the HS256 fast path.
TOKEN_CACHE_SIZE = 10_000
# Tokens minted for one role carry the same pattern lists: their Claims share one tuple (bounded:
# up to this many distinct short lists are remembered, then the memo starts over).
SHARED_PATTERN_LISTS = 256
SHARED_PATTERN_MAX_LEN = 16

# -- HS256 without PyJWT's per-call overhead ---------------------------------------------------------
# Every check below mirrors PyJWT 2.15 (api_jws._load/_decode_base64url_segment/_validate_headers and
# api_jwt._validate_claims with our options); tests/unit/test_auth_hs256.py proves the verdicts equal.
# Three dot-separated segments of the base64url alphabet, each followed by at most two '=' (PyJWT strips
# up to two, refuses a third, and finds any other byte, '.' included, outside its alphabet).
_COMPACT = re.compile(r"([A-Za-z0-9_-]*)(={0,2})\.([A-Za-z0-9_-]*)(={0,2})\.([A-Za-z0-9_-]*)(={0,2})")
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# PyJWT re-encodes each segment and refuses it unless identical: the last character may carry no unused
# bits (4 of them after 2 characters in the final group, 2 after 3).
_CANONICAL_LAST = {2: frozenset(_B64URL[::16]), 3: frozenset(_B64URL[::4])}
# orjson reads what json.loads (PyJWT's parser) reads, except where it fails (NaN, Infinity, 1e400, a BOM,
# UTF-16/32, lone surrogates: json.loads then decides), nests past json.loads's recursion limit (so deep
# texts go to json.loads), and reads integers beyond 64 bits as floats (re-read for the time claims).
_ORJSON_MAX_BRACKETS = 256
_TIME_CLAIMS = ("exp", "nbf", "iat")
# Header segments that passed the header checks, remembered per verifier (bounded: any client may send
# well-formed headers of its own; short ones only, whose JSON nests too shallowly to hit a recursion limit).
_GOOD_HEADERS = 16
_GOOD_HEADER_CHARS = 256


PERSONAL_PREFIX = "user:"  # the namespace of personal channels: user:<sub>


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    exp: float
    channels: tuple[str, ...]  # patterns the user may subscribe to
    publish: tuple[str, ...]  # patterns the user may publish to
    jti: str | None = None

    @property
    def personal_channel(self) -> str:
        return f"{PERSONAL_PREFIX}{self.sub}"

    def may_subscribe(self, channel: str) -> bool:
        """A personal channel (user:<sub>) is its user's alone, whatever patterns the token holds:
        a `*` meant for conversations must not read everybody's notifications."""
        if channel.startswith(PERSONAL_PREFIX):
            return channel == self.personal_channel
        return allowed(self.channels, channel)

    def may_publish(self, channel: str) -> bool:
        """Publishing to another user's personal channel takes an exact entry for it: a wildcard
        never reaches into somebody's notifications."""
        if channel.startswith(PERSONAL_PREFIX) and channel != self.personal_channel:
            return channel in self.publish
        return allowed(self.publish, channel)


class AuthFailure(Exception):
    MESSAGES = {"missing": "missing token", "invalid": "invalid token", "expired": "token expired"}

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def client_message(self) -> str:
        return self.MESSAGES[self.kind]


def allowed(patterns: Iterable[str], channel: str) -> bool:
    """Exact names, or a prefix ending in `*` (`conversation:*`; a lone `*` allows any channel)."""
    for p in patterns:
        if p == channel or (p.endswith("*") and channel.startswith(p[:-1])):
            return True
    return False


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # str secret or a cryptography public key object
    valid_until: float | None = None  # a rotated-out key stops working at this time


@dataclass(frozen=True, slots=True)
class _HmacKey:
    source: VerificationKey
    secret: bytes | None  # None: PyJWT refuses this key, so a token that gets as far as the signature is invalid
    problem: str = ""


def _prepare_hmac_key(key: VerificationKey) -> _HmacKey:
    """PyJWT's own key checks (not empty, not a PEM/SSH/DER/JWK key), once per key instead of once per token."""
    algorithm = HMACAlgorithm(HMACAlgorithm.SHA256)
    try:
        secret = algorithm.prepare_key(key.key)
    except Exception as exc:
        return _HmacKey(key, None, f"{type(exc).__name__}: {exc}")
    if message := algorithm.check_key_length(secret):
        warnings.warn(message, InsecureKeyLengthWarning, stacklevel=3)  # PyJWT repeats this on every decode
    return _HmacKey(key, secret)


def _canonical(data: str, padding: str) -> bool:
    """PyJWT's _decode_base64url_segment acceptance, for a segment already known to be in the alphabet."""
    rem = len(data) % 4
    if padding and (rem + len(padding)) % 4:
        return False  # '=' only as the exact padding of the last group
    return rem == 0 or (rem != 1 and data[-1] in _CANONICAL_LAST[rem])


def _b64decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _json(data: bytes) -> Any:
    """json.loads(data), as PyJWT calls it, through orjson where the two agree."""
    if data.count(b"[") + data.count(b"{") <= _ORJSON_MAX_BRACKETS:
        try:
            return orjson.loads(data)
        except Exception:
            pass  # json.loads may still take it (NaN, a BOM, UTF-16, ...): it decides
    return json.loads(data)


def _header_problem(header: Any) -> str | None:
    """PyJWT's header checks with algorithms=["HS256"]; `typ` and unknown fields are ignored, as PyJWT does."""
    if not isinstance(header, dict):
        return "DecodeError: header is not a JSON object"
    if "kid" in header and not isinstance(header["kid"], str):
        return "InvalidTokenError: kid is not a string"
    if "crit" in header:
        crit = header["crit"]
        if not isinstance(crit, list) or not crit:
            return "InvalidTokenError: crit is not a non-empty list"
        for ext in crit:
            # PyJWT understands only "b64", and only when the header carries it too
            if not isinstance(ext, str) or ext != "b64" or ext not in header:
                return "InvalidTokenError: unsupported critical extension"
    if header.get("b64", True) is False:
        return "DecodeError: detached payloads (b64 false) are not accepted"
    if header.get("alg") != "HS256":
        return "InvalidAlgorithmError: alg is not HS256"
    return None


def load_key(config: Config, *, previous: bool = False) -> Any | None:
    """The key for config's algorithm, or None when that slot is empty."""
    if config.jwt_algorithm == "HS256":
        secret = config.jwt_previous_secret if previous else config.jwt_secret
        return secret or None
    path = config.jwt_previous_public_key if previous else config.jwt_public_key
    if not path:
        return None
    key = load_pem_public_key(Path(path).read_bytes())
    expected = rsa.RSAPublicKey if config.jwt_algorithm == "RS256" else ec.EllipticCurvePublicKey
    if not isinstance(key, expected):  # one algorithm family per key: no key confusion
        raise ValueError(f"{path} is not a key for {config.jwt_algorithm}")
    return key


class TokenVerifier:
    def __init__(
        self,
        keys: Sequence[VerificationKey],
        algorithm: str = "HS256",
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 5.0,
        max_ttl: float = 86400.0,
        max_bytes: int = 8192,
    ) -> None:
        if not keys:
            raise ValueError("a TokenVerifier needs at least one key")
        self.keys = tuple(keys)
        self.algorithms = [algorithm]  # exactly one, always passed: no alg confusion, no "none"
        self.issuer = issuer or None
        self.audience = audience or None
        self.leeway = leeway
        self.max_ttl = max_ttl
        self.max_bytes = max_bytes
        # verify_aud stays on without a configured audience: a token minted for another service
        # (it carries an `aud`) is then refused rather than accepted here.
        self.options: Any = {"require": ["exp", "sub"], "verify_aud": True}
        # digest of the token -> claims (usable until exp + leeway), or (claims, usable until) when a
        # rotated-out key ends it sooner. A 16-byte digest, not the ~250-character token, per entry.
        self.cache: dict[bytes, Claims | tuple[Claims, float]] = {}
        self.pattern_lists: dict[tuple[str, ...], tuple[str, ...]] = {}
        self.hmac_keys = self._hmac_keys()
        self.good_headers: set[str] = set()

    @classmethod
    def from_config(cls, config: Config, previous_valid_until: float | None = None) -> TokenVerifier:
        keys = [VerificationKey(load_key(config))]
        previous = load_key(config, previous=True)
        if previous is not None:
            keys.append(VerificationKey(previous, previous_valid_until))
        return cls(keys, config.jwt_algorithm, issuer=config.jwt_issuer, audience=config.jwt_audience,
                   leeway=config.jwt_leeway, max_ttl=config.max_token_ttl, max_bytes=config.max_token_bytes)

    def with_previous(self, old: TokenVerifier, valid_until: float) -> TokenVerifier:
        """This verifier, also accepting `old`'s current key until `valid_until` (key rotation)."""
        extra = [VerificationKey(k.key, valid_until) for k in old.keys[:1]
                 if all(k.key != mine.key for mine in self.keys)]
        clone = TokenVerifier.__new__(TokenVerifier)
        for slot in ("algorithms", "issuer", "audience", "leeway", "max_ttl", "max_bytes", "options"):
            setattr(clone, slot, getattr(self, slot))
        clone.keys = self.keys + tuple(extra)
        clone.cache = {}
        clone.pattern_lists = {}
        clone.hmac_keys = clone._hmac_keys()
        clone.good_headers = set()
        return clone

    def _hmac_keys(self) -> tuple[_HmacKey, ...] | None:
        """The keys prepared for the HS256 fast path, or None when the algorithm is not HS256."""
        return tuple(_prepare_hmac_key(k) for k in self.keys) if self.algorithms == ["HS256"] else None

    def verify(self, token: str | None, now: float) -> Claims:
        if not token:
            raise AuthFailure("missing", "no token in the request")
        if len(token) > self.max_bytes:
            raise AuthFailure("invalid", f"token of {len(token)} bytes is over the {self.max_bytes} cap")
        digest = _digest(token)
        hit = self.cache.get(digest)
        if hit is not None:
            claims, usable_until = hit if type(hit) is tuple else (hit, hit.exp + self.leeway)
            if now <= usable_until and claims.exp <= now + self.max_ttl + self.leeway:
                return claims
            del self.cache[digest]  # expired, key rotated out, clock stepped back: decode decides
        payload, key = self._decode(token, now)
        claims = self._claims(payload, now)
        if len(self.cache) >= TOKEN_CACHE_SIZE:
            del self.cache[next(iter(self.cache))]  # the oldest entry
        until = claims.exp + self.leeway
        if key.valid_until is None or key.valid_until >= until:
            self.cache[digest] = claims
        else:
            self.cache[digest] = (claims, key.valid_until)
        return claims

    def _decode(self, token: str, now: float) -> tuple[dict[str, Any], VerificationKey]:
        # HS256 by hand: ~11 us per verify of a unique token, against ~41 us through jwt.decode (timeit, this machine)
        if self.hmac_keys is not None and isinstance(token, str):
            return self._decode_hs256(token, now)
        return self._decode_pyjwt(token, now)

    def _decode_pyjwt(self, token: str, now: float) -> tuple[dict[str, Any], VerificationKey]:
        """RS256/ES256, and the reference the HS256 fast path is tested against. PyJWT reads the wall clock."""
        last: Exception | None = None
        for k in self.keys:
            if k.valid_until is not None and now > k.valid_until:
                continue
            try:
                payload: dict[str, Any] = jwt.decode(
                    token, k.key, algorithms=self.algorithms, options=self.options,
                    issuer=self.issuer, audience=self.audience, leeway=self.leeway,
                )
                return payload, k
            except jwt.InvalidSignatureError as exc:
                last = exc  # maybe signed with the other key during a rotation
            except jwt.ExpiredSignatureError:
                raise AuthFailure("expired", "exp is in the past") from None
            except jwt.PyJWTError as exc:
                raise AuthFailure("invalid", f"{type(exc).__name__}: {exc}") from None
            except Exception as exc:  # a malformed token must never escape as a crash
                raise AuthFailure("invalid", f"undecodable: {type(exc).__name__}") from None
        raise AuthFailure("invalid", f"signature: {last}")

    def _decode_hs256(self, token: str, now: float) -> tuple[dict[str, Any], VerificationKey]:
        """What jwt.decode does for this verifier's HS256 options, judging exp/nbf/iat at `now`."""
        match = _COMPACT.fullmatch(token)
        if match is None:
            raise AuthFailure("invalid", "DecodeError: not three base64url segments")
        header_b64, header_pad, payload_b64, payload_pad, signature_b64, signature_pad = match.groups()
        if not (_canonical(header_b64, header_pad) and _canonical(payload_b64, payload_pad)
                and _canonical(signature_b64, signature_pad)):
            raise AuthFailure("invalid", "DecodeError: a segment is not canonical base64url")
        header_segment = token[:match.end(2)]
        if header_segment not in self.good_headers:  # one issuer sends one header: judge it once
            try:
                header = _json(_b64decode(header_b64))
            except Exception:
                raise AuthFailure("invalid", "DecodeError: header is not JSON") from None
            if problem := _header_problem(header):
                raise AuthFailure("invalid", problem)
            if len(self.good_headers) < _GOOD_HEADERS and len(header_b64) <= _GOOD_HEADER_CHARS:
                self.good_headers.add(header_segment)
        signature = _b64decode(signature_b64)
        signing_input = token[:match.end(4)].encode("ascii")  # as sent, padding included
        for k in self.hmac_keys or ():
            if k.source.valid_until is not None and now > k.source.valid_until:
                continue
            if k.secret is None:
                raise AuthFailure("invalid", k.problem)  # PyJWT stops at a refused key, tries no other
            if hmac.compare_digest(signature, hmac.digest(k.secret, signing_input, "sha256")):
                break
            # else maybe signed with the other key during a rotation
        else:
            raise AuthFailure("invalid", "signature: InvalidSignatureError")
        data = _b64decode(payload_b64)
        try:
            payload = _json(data)
            if isinstance(payload, dict):
                for claim in _TIME_CLAIMS:
                    value = payload.get(claim)
                    if type(value) is float and abs(value) >= 2.0**63:
                        payload = json.loads(data)  # maybe an integer orjson turned into a float: as PyJWT reads it
                        break
        except Exception:
            raise AuthFailure("invalid", "DecodeError: payload is not JSON") from None
        if not isinstance(payload, dict):
            raise AuthFailure("invalid", "DecodeError: payload is not a JSON object")
        self._registered_claims(payload, now)
        return payload, k.source

    def _registered_claims(self, payload: dict[str, Any], now: float) -> None:
        """PyJWT's _validate_claims with our options, in its order, with its int() coercions (which take
        digit strings and booleans: _claims refuses those exps afterwards, but an exp of true is "expired")."""
        for claim in ("exp", "sub"):  # options["require"]: null counts as missing
            if payload.get(claim) is None:
                raise AuthFailure("invalid", f"MissingRequiredClaimError: no {claim}")
        leeway = self.leeway
        if "iat" in payload:
            try:
                iat = int(payload["iat"])
            except (ValueError, TypeError, OverflowError):
                raise AuthFailure("invalid", "InvalidIssuedAtError: iat is not an integer") from None
            if iat > now + leeway:
                raise AuthFailure("invalid", "ImmatureSignatureError: iat is in the future")
        if "nbf" in payload:
            try:
                nbf = int(payload["nbf"])
            except (ValueError, TypeError, OverflowError):
                raise AuthFailure("invalid", "DecodeError: nbf is not an integer") from None
            if nbf > now + leeway:
                raise AuthFailure("invalid", "ImmatureSignatureError: nbf is in the future")
        try:
            exp = int(payload["exp"])
        except (ValueError, TypeError, OverflowError):
            raise AuthFailure("invalid", "DecodeError: exp is not an integer") from None
        if exp <= now - leeway:
            raise AuthFailure("expired", "exp is in the past")
        if self.issuer is not None:
            iss = payload.get("iss")
            if not isinstance(iss, str) or iss != self.issuer:  # missing, not a string, or another issuer
                raise AuthFailure("invalid", "InvalidIssuerError: iss is not ours")
        aud = payload.get("aud")  # a falsy aud ("", [], 0, false, null) counts as absent, as in PyJWT
        if self.audience is None:
            if aud:
                raise AuthFailure("invalid", "InvalidAudienceError: aud given, none expected")
        else:
            if not aud:
                raise AuthFailure("invalid", "MissingRequiredClaimError: no aud")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or any(not isinstance(a, str) for a in audiences):
                raise AuthFailure("invalid", "InvalidAudienceError: aud is not a string or a list of strings")
            if self.audience not in audiences:
                raise AuthFailure("invalid", "InvalidAudienceError: aud is not ours")
        if not isinstance(payload["sub"], str):
            raise AuthFailure("invalid", "InvalidSubjectError: sub is not a string")
        if "jti" in payload and not isinstance(payload["jti"], str):
            raise AuthFailure("invalid", "InvalidJTIError: jti is not a string")

    def _claims(self, payload: dict[str, Any], now: float) -> Claims:
        exp = payload.get("exp")
        # PyJWT accepts "exp" as a digit string and a bool is an int in Python: insist on a number.
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise AuthFailure("invalid", "exp is not a number")
        if exp > now + self.max_ttl + self.leeway:
            raise AuthFailure("invalid", "exp is further ahead than the maximum token lifetime")
        sub = payload.get("sub")
        if not isinstance(sub, str) or not SUBJECT.fullmatch(sub):
            raise AuthFailure("invalid", "sub must be 1-128 characters of [A-Za-z0-9_-.@:]")
        jti = payload.get("jti")
        return Claims(
            sub=sub,
            exp=float(exp),
            channels=self._shared(_patterns(payload, "channels")),
            publish=self._shared(_patterns(payload, "publish")),
            jti=jti if isinstance(jti, str) else None,
        )


    def _shared(self, patterns: tuple[str, ...]) -> tuple[str, ...]:
        """The equal tuple an earlier token brought, so that its Claims share it."""
        if len(patterns) > SHARED_PATTERN_MAX_LEN:
            return patterns
        shared = self.pattern_lists.get(patterns)
        if shared is not None:
            return shared
        if len(self.pattern_lists) >= SHARED_PATTERN_LISTS:
            self.pattern_lists.clear()
        self.pattern_lists[patterns] = patterns
        return patterns


def _digest(token: str) -> bytes:
    """The cache key of a token: 128 bits of BLAKE2b, so equal keys mean the same token string."""
    return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _patterns(payload: dict[str, Any], name: str) -> tuple[str, ...]:
    value = payload.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise AuthFailure("invalid", f"{name} must be a list of at most {MAX_PATTERNS} patterns")
    for p in value:
        if not _short_string(p):
            raise AuthFailure("invalid", f"{name} holds a pattern that is not a short string")
    return tuple(value)


def _short_string(p: Any) -> bool:
    try:
        return isinstance(p, str) and 0 < len(p.encode()) <= MAX_PATTERN_BYTES
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" is valid JSON to json.loads): a refusal, not a crash
        return False
