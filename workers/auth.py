"""Token checks and channel permissions. Pure: no sockets, no logging, never prints a token.

`TokenVerifier.verify(token, now)` returns `Claims` or raises `AuthFailure` whose `kind` is
what the client is told ("missing", "invalid", "expired") and whose `detail` is for the log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tidings.config import Config

SUBJECT = re.compile(r"[A-Za-z0-9_\-.@:]{1,128}")  # sub becomes the channel user:<sub>
MAX_PATTERNS = 256
MAX_PATTERN_BYTES = 256
# Reconnect storms (a worker restart, a network blip) bring back the very same tokens: remember
# the claims of recent tokens, keyed by the whole token string, to skip PyJWT's ~50 us decode.
TOKEN_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    exp: float
    channels: tuple[str, ...]  # patterns the user may subscribe to
    publish: tuple[str, ...]  # patterns the user may publish to
    jti: str | None = None

    @property
    def personal_channel(self) -> str:
        return f"user:{self.sub}"

    def may_subscribe(self, channel: str) -> bool:
        return channel == self.personal_channel or allowed(self.channels, channel)

    def may_publish(self, channel: str) -> bool:
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
        self.cache: dict[str, tuple[Claims, float]] = {}  # token -> (claims, usable until)

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
        return clone

    def verify(self, token: str | None, now: float) -> Claims:
        if not token:
            raise AuthFailure("missing", "no token in the request")
        if len(token) > self.max_bytes:
            raise AuthFailure("invalid", f"token of {len(token)} bytes is over the {self.max_bytes} cap")
        hit = self.cache.get(token)
        if hit is not None:
            claims, usable_until = hit
            if now <= usable_until and claims.exp <= now + self.max_ttl + self.leeway:
                return claims
            del self.cache[token]  # expired, key rotated out, clock stepped back: decode decides
        payload, key = self._decode(token, now)
        claims = self._claims(payload, now)
        if len(self.cache) >= TOKEN_CACHE_SIZE:
            del self.cache[next(iter(self.cache))]  # the oldest entry
        until = claims.exp + self.leeway
        self.cache[token] = (claims, until if key.valid_until is None else min(until, key.valid_until))
        return claims

    def _decode(self, token: str, now: float) -> tuple[dict[str, Any], VerificationKey]:
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
            channels=_patterns(payload, "channels"),
            publish=_patterns(payload, "publish"),
            jti=jti if isinstance(jti, str) else None,
        )


def _patterns(payload: dict[str, Any], name: str) -> tuple[str, ...]:
    value = payload.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise AuthFailure("invalid", f"{name} must be a list of at most {MAX_PATTERNS} patterns")
    for p in value:
        if not isinstance(p, str) or not p or len(p.encode()) > MAX_PATTERN_BYTES:
            raise AuthFailure("invalid", f"{name} holds a pattern that is not a short string")
    return tuple(value)
