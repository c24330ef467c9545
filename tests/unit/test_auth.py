"""workers/auth.py: one test per claim rule, through TokenVerifier.verify with real PyJWT tokens.

PyJWT (RS256/ES256) checks exp/nbf/iat against the wall clock and the HS256 fast path against the
`now` passed to verify (the server passes time.time()), so tokens are made relative to time.time().
test_auth_hs256.py proves the HS256 fast path gives PyJWT's verdicts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import workers.auth
from tidings.config import Config
from workers.auth import (
    MAX_PATTERN_BYTES,
    MAX_PATTERNS,
    AuthFailure,
    Claims,
    TokenVerifier,
    VerificationKey,
    allowed,
    load_key,
)

from .helpers import DROP, OTHER_SECRET, SECRET, b64, claims_payload, forge, hs_verifier, make_token


@pytest.fixture
def now() -> float:
    return time.time()


def assert_refused(verifier: TokenVerifier, token: str | None, now: float, kind: str = "invalid") -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        verifier.verify(token, now)
    assert info.value.kind == kind, info.value
    return info.value


# -- keys ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- valid ----------------------------------------------------------------------------------------------
def test_valid_token_gives_claims(now: float) -> None:
    token = make_token(now, channels=["conversation:*", "task:1"], publish=["conversation:*"], jti="j-1")
    claims = hs_verifier().verify(token, now)
    assert claims == Claims(sub="u1", exp=float(int(now) + 600), channels=("conversation:*", "task:1"),
                            publish=("conversation:*",), jti="j-1")
    assert isinstance(claims.exp, float)
    assert claims.personal_channel == "user:u1"


def test_channels_and_publish_default_to_nothing(now: float) -> None:
    claims = hs_verifier().verify(make_token(now, channels=DROP, publish=DROP), now)
    assert (claims.channels, claims.publish, claims.jti) == ((), (), None)


def test_non_string_jti_is_refused(now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, jti=123), now)


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        TokenVerifier([])


# -- missing, malformed, over-size -------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None, now: float) -> None:
    failure = assert_refused(hs_verifier(), token, now, "missing")
    assert failure.client_message == "missing token"


@pytest.mark.parametrize("token", [
    "garbage", "a.b", "a.b.c", "a.b.c.d", "...", "é.é.é", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9",
    b64(b"{}") + "." + b64(b"{}") + ".", " ",
])
def test_garbage_tokens_are_invalid(token: str, now: float) -> None:
    failure = assert_refused(hs_verifier(), token, now)
    assert failure.client_message == "invalid token"


def test_two_segments_of_a_real_token_are_invalid(now: float) -> None:
    header, payload, _ = make_token(now).split(".")
    assert_refused(hs_verifier(), f"{header}.{payload}", now)


def test_non_object_payload_is_invalid(now: float) -> None:
    assert_refused(hs_verifier(), forge({"alg": "HS256", "typ": "JWT"}, ["sub", "u1"], SECRET.encode()), now)


def test_deeply_nested_payload_is_invalid_not_a_crash(now: float) -> None:
    header = b64(json.dumps({"alg": "HS256"}).encode())
    body = b64(b'{"sub":"u1","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    verifier = hs_verifier(max_bytes=10_000_000)
    assert_refused(verifier, f"{header}.{body}.{b64(b'sig')}", now)


def test_oversize_token_is_refused_before_decoding(now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    def decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoded a token over the size cap")

    token = make_token(now, jti="x" * 9000)
    assert len(token) > 8192
    monkeypatch.setattr(workers.auth.jwt, "decode", decode)
    monkeypatch.setattr(TokenVerifier, "_decode_hs256", decode)
    failure = assert_refused(hs_verifier(), token, now)
    assert "cap" in failure.detail


def test_size_cap_is_inclusive(now: float) -> None:
    token = make_token(now)
    assert hs_verifier(max_bytes=len(token)).verify(token, now).sub == "u1"
    assert "cap" in assert_refused(hs_verifier(max_bytes=len(token) - 1), token, now).detail


def test_default_size_cap_is_8_kib(now: float) -> None:
    # base64 cannot reach every length from one field: vary two until the token is exactly 8 KiB
    fits = next(t for sub in ("u1", "u12", "u123") for n in range(5900, 6100)
                if len(t := make_token(now, sub=sub, jti="x" * n)) == 8192)
    assert hs_verifier().verify(fits, now).sub == "u1"
    too_big = make_token(now, jti="x" * (8192 - len(make_token(now, jti="")) + 4))
    assert len(too_big) > 8192
    assert "cap" in assert_refused(hs_verifier(), too_big, now).detail


# -- algorithms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused(alg: str, now: float) -> None:
    assert_refused(hs_verifier(), forge({"alg": alg, "typ": "JWT"}, claims_payload(now), None), now)


def test_alg_none_with_a_signature_is_refused(now: float) -> None:
    assert_refused(hs_verifier(), forge({"alg": "none"}, claims_payload(now), SECRET.encode()), now)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing with a 49-byte key
@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused(alg: str, now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, algorithm=alg), now)


def test_rs256_header_with_an_hmac_signature_by_the_secret_is_refused(now: float) -> None:
    assert_refused(hs_verifier(), forge({"alg": "RS256", "typ": "JWT"}, claims_payload(now), SECRET.encode()), now)


def test_rs256_token_is_refused_by_an_hs256_verifier(now: float, rsa_key: rsa.RSAPrivateKey) -> None:
    assert_refused(hs_verifier(), make_token(now, rsa_key, "RS256"), now)


def test_bad_signature(now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, OTHER_SECRET), now)


def test_tampered_payload(now: float) -> None:
    header, _, signature = make_token(now, channels=["conversation:conv-1"]).split(".")
    forged = b64(json.dumps(claims_payload(now, channels=["*"])).encode())
    assert_refused(hs_verifier(), f"{header}.{forged}.{signature}", now)


def test_unknown_crit_header_is_refused(now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, headers={"crit": ["x-tidings"], "x-tidings": 1}), now)


# -- RS256 / ES256 and key-family confusion ------------------------------------------------------------------
def test_rs256(now: float, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier([VerificationKey(rsa_key.public_key())], "RS256")
    assert verifier.verify(make_token(now, rsa_key, "RS256"), now).sub == "u1"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_refused(verifier, make_token(now, other, "RS256"), now)


def test_es256(now: float, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier([VerificationKey(ec_key.public_key())], "ES256")
    assert verifier.verify(make_token(now, ec_key, "ES256"), now).sub == "u1"
    assert_refused(verifier, make_token(now, ec.generate_private_key(ec.SECP256R1()), "ES256"), now)


def test_hs256_signed_with_the_public_key_pem_is_refused_by_rs256(now: float, rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic confusion: the attacker HMACs with the public key the server verifies with.
    verifier = TokenVerifier([VerificationKey(rsa_key.public_key())], "RS256")
    token = forge({"alg": "HS256", "typ": "JWT"}, claims_payload(now), pem(rsa_key.public_key()))
    assert_refused(verifier, token, now)


def test_es256_token_is_refused_by_rs256_and_the_reverse(now: float, rsa_key: rsa.RSAPrivateKey,
                                                         ec_key: ec.EllipticCurvePrivateKey) -> None:
    rs = TokenVerifier([VerificationKey(rsa_key.public_key())], "RS256")
    es = TokenVerifier([VerificationKey(ec_key.public_key())], "ES256")
    assert_refused(rs, make_token(now, ec_key, "ES256"), now)
    assert_refused(es, make_token(now, rsa_key, "RS256"), now)
    assert_refused(rs, make_token(now, SECRET), now)


def test_load_key_from_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
                              now: float) -> None:
    rsa_file, ec_file = tmp_path / "rsa.pem", tmp_path / "ec.pem"
    rsa_file.write_bytes(pem(rsa_key.public_key()))
    ec_file.write_bytes(pem(ec_key.public_key()))
    base = Config.load(environ={})
    assert load_key(base.replace(jwt_secret=SECRET)) == SECRET
    assert load_key(base) is None
    assert load_key(base.replace(jwt_algorithm="RS256")) is None
    assert isinstance(load_key(base.replace(jwt_algorithm="RS256", jwt_public_key=str(rsa_file))), rsa.RSAPublicKey)
    assert isinstance(load_key(base.replace(jwt_algorithm="ES256", jwt_public_key=str(ec_file))),
                      ec.EllipticCurvePublicKey)
    with pytest.raises(ValueError, match="not a key for ES256"):
        load_key(base.replace(jwt_algorithm="ES256", jwt_public_key=str(rsa_file)))
    with pytest.raises(ValueError, match="not a key for RS256"):
        load_key(base.replace(jwt_algorithm="RS256", jwt_public_key=str(ec_file)))
    verifier = TokenVerifier.from_config(base.replace(jwt_algorithm="RS256", jwt_public_key=str(rsa_file)))
    assert verifier.verify(make_token(now, private_pem(rsa_key), "RS256"), now).sub == "u1"


# -- exp, nbf, iat --------------------------------------------------------------------------------------------
def test_expired_token(now: float) -> None:
    failure = assert_refused(hs_verifier(), make_token(now, iat=int(now) - 120, exp=int(now) - 60), now, "expired")
    assert failure.client_message == "token expired"


def test_exp_within_leeway_is_accepted(now: float) -> None:
    assert hs_verifier().verify(make_token(now, iat=int(now) - 60, exp=int(now) - 2), now).sub == "u1"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_nbf_and_iat_in_the_future_are_refused(claim: str, now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, **{claim: int(now) + 60}), now)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_nbf_and_iat_within_leeway_are_accepted(claim: str, now: float) -> None:
    assert hs_verifier().verify(make_token(now, **{claim: int(now) + 2}), now).sub == "u1"


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_missing_required_claim(claim: str, now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, **{claim: DROP}), now)


def test_exp_as_a_digit_string_is_refused(now: float) -> None:
    failure = assert_refused(hs_verifier(), make_token(now, exp=str(int(now) + 600)), now)
    assert "not a number" in failure.detail


@pytest.mark.parametrize("exp", ["soon", "", None, [1], {"t": 1}])
def test_exp_of_other_types_is_refused(exp: object, now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, exp=exp), now)


@pytest.mark.parametrize("exp", [True, False])
def test_exp_as_a_bool_is_refused(exp: bool, now: float) -> None:
    # PyJWT reads True as 1 (1970), so this surfaces as "expired"; either way, never accepted.
    with pytest.raises(AuthFailure):
        hs_verifier().verify(make_token(now, exp=exp), now)


@pytest.mark.parametrize("exp", [1e30, 1e300])
def test_exp_that_never_comes_is_refused(exp: float, now: float) -> None:
    failure = assert_refused(hs_verifier(), make_token(now, exp=exp), now)
    assert "maximum token lifetime" in failure.detail


def test_exp_beyond_max_ttl(now: float) -> None:
    verifier = hs_verifier(max_ttl=3600.0, leeway=5.0)
    assert verifier.verify(make_token(now, exp=now + 3600), now).sub == "u1"
    assert verifier.verify(make_token(now, exp=now + 3604), now).sub == "u1"  # within leeway
    assert "maximum" in assert_refused(verifier, make_token(now, exp=now + 3606), now).detail


def test_max_ttl_is_measured_from_the_now_given(now: float) -> None:
    token = make_token(now, exp=int(now) + 600)
    verifier = hs_verifier(max_ttl=1000.0)
    assert verifier.verify(token, now).sub == "u1"
    assert_refused(verifier, token, now - 1000)  # seen from earlier, the token lives too long


def test_exp_may_be_a_float(now: float) -> None:
    assert hs_verifier().verify(make_token(now, exp=now + 600.5), now).exp == pytest.approx(now + 600.5)


# -- sub --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", [1, 1.5, True, ["u1"], {"id": "u1"}, None])
def test_sub_must_be_a_string(sub: object, now: float) -> None:
    assert_refused(hs_verifier(), make_token(now, sub=sub), now)


@pytest.mark.parametrize("sub", ["", "u 1", "u/1", "../u", "u*", "u\u0000", "ü", "u\n", "x" * 129])
def test_sub_with_bad_characters_or_length(sub: str, now: float) -> None:
    failure = assert_refused(hs_verifier(), make_token(now, sub=sub), now)
    assert failure.client_message == "invalid token"


@pytest.mark.parametrize("sub", ["u1", "user-456@example.com", "a.b_c:d", "x" * 128])
def test_good_subs(sub: str, now: float) -> None:
    claims = hs_verifier().verify(make_token(now, sub=sub), now)
    assert claims.personal_channel == f"user:{sub}"


# -- channels and publish ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("claim", ["channels", "publish"])
@pytest.mark.parametrize("value", [{"a": 1}, 5, True, None, [1], [""], [None], [["a:*"]], ["\ud800"],
                                   ["x" * (MAX_PATTERN_BYTES + 1)], ["a:b"] * (MAX_PATTERNS + 1)])
def test_pattern_claims_must_be_short_lists_of_strings(claim: str, value: object, now: float) -> None:
    failure = assert_refused(hs_verifier(), make_token(now, **{claim: value}), now)
    assert claim in failure.detail


@pytest.mark.parametrize("claim", ["channels", "publish"])
def test_pattern_limits_are_inclusive(claim: str, now: float) -> None:
    at_limit = ["x" * MAX_PATTERN_BYTES] * MAX_PATTERNS
    verifier = hs_verifier(max_bytes=1_000_000)
    assert getattr(verifier.verify(make_token(now, **{claim: at_limit}), now), claim) == tuple(at_limit)


def test_a_single_string_pattern_is_read_as_a_list(now: float) -> None:
    claims = hs_verifier().verify(make_token(now, channels="conversation:*", publish="task:1"), now)
    assert (claims.channels, claims.publish) == (("conversation:*",), ("task:1",))


# -- issuer and audience -------------------------------------------------------------------------------------------
def test_issuer_when_configured(now: float) -> None:
    verifier = hs_verifier(issuer="https://auth.example")
    assert verifier.verify(make_token(now, iss="https://auth.example"), now).sub == "u1"
    for iss in ("https://auth.example.evil", "https://auth.exampl", "https://evil", "", "HTTPS://AUTH.EXAMPLE"):
        assert_refused(verifier, make_token(now, iss=iss), now)
    for iss in (["https://auth.example"], 1, None):  # PyJWT will not sign these: forge them
        assert_refused(verifier, forge({"alg": "HS256"}, claims_payload(now, iss=iss), SECRET.encode()), now)
    assert_refused(verifier, make_token(now), now)  # missing


def test_issuer_not_checked_when_not_configured(now: float) -> None:
    assert hs_verifier().verify(make_token(now, iss="anyone"), now).sub == "u1"


def test_audience_when_configured(now: float) -> None:
    verifier = hs_verifier(audience="tidings")
    assert verifier.verify(make_token(now, aud="tidings"), now).sub == "u1"
    assert verifier.verify(make_token(now, aud=["other", "tidings"]), now).sub == "u1"
    for aud in ("tidings-admin", "tiding", "other", ["other"]):
        assert_refused(verifier, make_token(now, aud=aud), now)
    assert_refused(verifier, make_token(now), now)  # missing


# -- rotation -------------------------------------------------------------------------------------------------
def test_rotation_accepts_the_old_key_until_valid_until(now: float) -> None:
    old = hs_verifier()
    new = TokenVerifier([VerificationKey(OTHER_SECRET)], "HS256")
    rotated = new.with_previous(old, valid_until=now + 100)
    old_token, new_token = make_token(now, SECRET), make_token(now, OTHER_SECRET)
    assert rotated.verify(old_token, now).sub == "u1"
    assert rotated.verify(old_token, now + 100).sub == "u1"
    assert rotated.verify(new_token, now + 100).sub == "u1"
    assert_refused(rotated, old_token, now + 100.001)
    assert rotated.verify(new_token, now + 101).sub == "u1"
    assert_refused(rotated, make_token(now, "z" * 40), now)


def test_rotation_keeps_the_new_settings(now: float) -> None:
    old = hs_verifier(issuer="old-iss")
    new = TokenVerifier([VerificationKey(OTHER_SECRET)], "HS256", issuer="new-iss", max_bytes=4096)
    rotated = new.with_previous(old, valid_until=now + 100)
    assert (rotated.issuer, rotated.max_bytes) == ("new-iss", 4096)
    assert rotated.verify(make_token(now, SECRET, iss="new-iss"), now).sub == "u1"
    assert_refused(rotated, make_token(now, SECRET, iss="old-iss"), now)


def test_rotation_with_the_same_key_adds_nothing(now: float) -> None:
    rotated = hs_verifier().with_previous(hs_verifier(), valid_until=now - 1)
    assert len(rotated.keys) == 1
    assert rotated.verify(make_token(now), now).sub == "u1"  # the current key has no deadline


def test_expired_token_signed_with_the_old_key_is_expired(now: float) -> None:
    rotated = TokenVerifier([VerificationKey(OTHER_SECRET)]).with_previous(hs_verifier(), now + 100)
    assert_refused(rotated, make_token(now, SECRET, iat=int(now) - 120, exp=int(now) - 60), now, "expired")


def test_from_config_with_a_previous_secret(now: float) -> None:
    config = Config.load(environ={}).replace(jwt_secret=OTHER_SECRET, jwt_previous_secret=SECRET)
    verifier = TokenVerifier.from_config(config, previous_valid_until=now + 10)
    assert verifier.verify(make_token(now, SECRET), now).sub == "u1"
    assert_refused(verifier, make_token(now, SECRET), now + 11)
    assert verifier.verify(make_token(now, OTHER_SECRET), now + 11).sub == "u1"


# -- allowed() ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("patterns", "channel", "expected"), [
    (["conversation:conv-1"], "conversation:conv-1", True),
    (["conversation:conv-1"], "conversation:conv-12", False),
    (["conversation:conv-12"], "conversation:conv-1", False),
    (["conversation:*"], "conversation:conv-1", True),
    (["conversation:*"], "conversations:x", False),
    (["conversation:*"], "task:conversation:x", False),
    (["conversation:conv-1*"], "conversation:conv-12", True),
    (["*"], "anything:at-all", True),
    (["*"], "user:someone-else", True),
    (["task:*:x"], "task:a:x", False),  # '*' is only a trailing wildcard
    (["task:*:x"], "task:*:x", True),
    ([], "conversation:conv-1", False),
    (["task:1", "conversation:*"], "conversation:c", True),
    (["task:1", "task:2"], "task:3", False),
])
def test_allowed(patterns: list[str], channel: str, expected: bool) -> None:
    assert allowed(patterns, channel) is expected


def test_claims_permissions() -> None:
    claims = Claims("u1", 0.0, channels=("conversation:*",), publish=("task:1",))
    assert claims.may_subscribe("user:u1")
    assert not claims.may_subscribe("user:u2")
    assert claims.may_subscribe("conversation:x")
    assert not claims.may_publish("user:u1")
    assert claims.may_publish("task:1")
    assert not claims.may_publish("conversation:x")


def test_auth_failure_client_messages_have_no_detail() -> None:
    assert {k: AuthFailure(k, "secret detail").client_message for k in ("missing", "invalid", "expired")} == \
        {"missing": "missing token", "invalid": "invalid token", "expired": "token expired"}


# -- the cache of verified tokens -------------------------------------------------------------------
def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts trips past the cache: into the HS256 fast path or jwt.decode, whichever the verifier uses."""
    calls: list[str] = []
    real = TokenVerifier._decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(TokenVerifier, "_decode", counting)
    return calls


def test_a_token_seen_before_is_not_decoded_again(now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = hs_verifier()
    token = make_token(now, exp=int(now) + 600)
    first = verifier.verify(token, now)
    calls = _count_decodes(monkeypatch)
    assert verifier.verify(token, now + 10) is first
    assert calls == []
    assert_refused(verifier, token + "x", now)  # only the exact same string hits
    assert calls == ["decode"]


def test_a_cached_token_is_decoded_again_once_past_exp(now: float, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = hs_verifier(leeway=5.0)
    token = make_token(now, exp=int(now) + 60)
    verifier.verify(token, now)
    calls = _count_decodes(monkeypatch)
    verifier.verify(token, int(now) + 65)  # exp + leeway: still the cache
    assert calls == []
    assert_refused(verifier, token, int(now) + 66, "expired")  # the HS256 path judges exp at the `now` given
    assert calls == ["decode"]


def test_tokens_of_one_role_share_their_pattern_lists_and_the_cache_keeps_no_token(now: float) -> None:
    # per-connection memory: one tuple per distinct pattern list, a 16-byte digest per cached token
    verifier = hs_verifier()
    a = verifier.verify(make_token(now, sub="a", channels=["conversation:*", "task:*"]), now)
    b = verifier.verify(make_token(now, sub="b", channels=["conversation:*", "task:*"]), now)
    c = verifier.verify(make_token(now, sub="c", channels=["conversation:*"]), now)
    assert a.channels is b.channels and a.channels == ("conversation:*", "task:*")
    assert c.channels == ("conversation:*",) and c.channels is not a.channels
    assert all(isinstance(key, bytes) and len(key) == 16 for key in verifier.cache)


def test_a_cached_token_of_a_rotated_out_key_stops_working_when_the_overlap_ends(now: float) -> None:
    old = TokenVerifier([VerificationKey("o" * 40)], "HS256")
    token = make_token(now, key="o" * 40, exp=int(now) + 3600)
    rotated = TokenVerifier([VerificationKey("n" * 40)], "HS256").with_previous(old, valid_until=now + 100)
    assert rotated.verify(token, now).sub == "u1"
    assert rotated.verify(token, now + 50).sub == "u1"  # from the cache, inside the overlap
    assert_refused(rotated, token, now + 101)


def test_personal_channels_are_their_users_alone() -> None:
    everything = Claims("u1", 0.0, channels=("*",), publish=("*",))
    assert everything.may_subscribe("user:u1")
    assert not everything.may_subscribe("user:u2")  # a lone * does not reach other users' channels
    assert not everything.may_subscribe("user:u")  # nor a prefix of one's own
    assert everything.may_subscribe("conversation:any")
    assert everything.may_publish("user:u1")  # one's own: the usual patterns apply
    assert not everything.may_publish("user:u2")  # another user's: only by exact entry
    prefixed = Claims("u1", 0.0, channels=("user:*",), publish=("user:*",))
    assert not prefixed.may_subscribe("user:u2") and not prefixed.may_publish("user:u2")
    exact = Claims("svc", 0.0, channels=(), publish=("user:u2",))
    assert exact.may_publish("user:u2") and not exact.may_publish("user:u3")
