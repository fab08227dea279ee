"""Attack suite, trust edges of introspection (RFC 7662): a deliberately broken authorization
server (a small HTTP server in this file) answers the gateway's introspection requests with
crafted JSON, redirects them elsewhere, or is one of two introspecting issuers. The gateway
must refuse answers that are not about an access token for this gateway from this issuer
(no or foreign aud, foreign or non-string iss, token_type refresh_token, nbf in the future),
never follow a redirect with a token in the body, and send an opaque token to the one issuer
configured for opaque tokens only (counted per server)."""

import http.server
import json
import threading
import time
import urllib.parse
from collections import Counter

import pytest
import requests

import rawdicom as rd
from conftest import Gateway, free_port, stop
from test_attack_dimse_commands import CONTEXTS


class FakeAuthServer:
    """A SMART authorization server whose introspection answers are chosen per token:
    `answers[token] = dict` (the JSON), or a callable returning (status, headers, body bytes).
    Unknown tokens are inactive. Every request is counted by path, and introspected tokens
    are recorded in order."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.answers = {}
        self.hits = Counter()
        self.tokens = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, status, body: bytes, headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                outer.hits[self.path] += 1
                if self.path.startswith("/.well-known/"):
                    doc = {"issuer": outer.url, "token_endpoint": f"{outer.url}/token",
                           "introspection_endpoint": f"{outer.url}/introspect", "jwks_uri": f"{outer.url}/jwks",
                           "capabilities": ["launch-standalone"], "grant_types_supported": ["authorization_code"]}
                    return self.reply(200, json.dumps(doc).encode(), [("Content-Type", "application/json")])
                if self.path == "/jwks":
                    return self.reply(200, b'{"keys": []}', [("Content-Type", "application/json")])
                self.reply(404, b"")

            def do_POST(self):
                outer.hits[self.path] += 1
                n = int(self.headers.get("Content-Length", 0))
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                if self.path != "/introspect":
                    return self.reply(404, b"")
                token = form.get("token", [""])[0]
                outer.tokens.append(token)
                a = outer.answers.get(token, {"active": False})
                if callable(a):
                    status, headers, body = a()
                    return self.reply(status, body, headers)
                self.reply(200, json.dumps(a).encode(), [("Content-Type", "application/json")])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def introspections(self) -> int:
        return self.hits["/introspect"]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def issuer_table(server, extra=""):
    return f'verify = "introspection"\nclient_id = "pacsgate"\nclient_secret = "s3cret"\nintrospection_cache_secs = 1\n{extra}'


@pytest.fixture(scope="module")
def servers():
    a, b = FakeAuthServer(), FakeAuthServer()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def strict_gateway(tmp_root, orthanc, servers):
    """One introspecting issuer (server A), default rules."""
    d = tmp_root / "attack-trust-strict"
    d.mkdir()
    g = Gateway(d, orthanc, servers[0], name="attack-trust-strict", issuer_extra=issuer_table(servers[0]))
    yield g
    stop(g.proc)


@pytest.fixture(scope="module")
def lenient_gateway(tmp_root, orthanc, servers):
    """Server A with introspection_aud_optional = true."""
    d = tmp_root / "attack-trust-aud-optional"
    d.mkdir()
    g = Gateway(d, orthanc, servers[0], name="attack-trust-aud-optional",
                issuer_extra=issuer_table(servers[0], "introspection_aud_optional = true"))
    yield g
    stop(g.proc)


def two_issuers(tmp_root, orthanc, servers, name, opaque_on):
    """Servers A and B both introspect; only `opaque_on` ("a" or "b") takes opaque tokens."""
    a, b = servers
    d = tmp_root / name
    d.mkdir()
    second = (f'[[issuers]]\nissuer = "{b.url}"\n'
              + issuer_table(b, f"opaque_tokens = {'true' if opaque_on == 'b' else 'false'}"))
    return Gateway(d, orthanc, a, name=name, issuer_extra=issuer_table(a, f"opaque_tokens = {'true' if opaque_on == 'a' else 'false'}"),
                   extra=second)


def good_answer(server, gateway, patient="PAT-A", **changes):
    now = int(time.time())
    a = {"active": True, "iss": server.url, "aud": f"{gateway.public_url}/dicom-web", "scope": "patient/ImagingStudy.rs",
         "patient": patient, "exp": now + 3600, "iat": now, "sub": "attacker", "client_id": "viewer", "token_type": "Bearer"}
    for k, v in changes.items():
        if v is DROP:
            a.pop(k, None)
        else:
            a[k] = v
    return a


DROP = object()


def qido(gateway, token):
    return requests.get(f"{gateway.public_url}/dicom-web/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)


def dimse_answer(gateway, token):
    a = rd.Association(gateway.dimse_port, timeout=15)
    try:
        return a.request(rd.associate_rq(gateway.ae_title, "ATTACKER", CONTEXTS[:2], token=token))
    finally:
        a.close()


_n = [0]


def fresh_token(label):
    """An opaque token nobody has introspected yet (answers are cached per token)."""
    _n[0] += 1
    return f"opaque-{label}-{time.time_ns()}-{_n[0]}"


def assert_refused(gateway, token):
    r = qido(gateway, token)
    assert r.status_code == 401, f"{r.status_code}: {r.text[:200]}"
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", "")
    rj = dimse_answer(gateway, token)
    assert isinstance(rj, rd.AssociateRJ) and rj.result == 1, f"DIMSE: {rj}"


def assert_accepted(gateway, token, orthanc, patient="PAT-A"):
    r = qido(gateway, token)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:200]}"
    assert {s["0020000D"]["Value"][0] for s in r.json()} == orthanc.studies[patient]
    ac = dimse_answer(gateway, token)
    assert isinstance(ac, rd.AssociateAC), f"DIMSE: {ac}"


CRAFTED = {
    "no_aud": dict(aud=DROP),
    "aud_of_someone_else": dict(aud="https://other.example/fhir"),
    "aud_list_without_the_gateway": dict(aud=["https://other.example/fhir", "http://127.0.0.1:1/dicom-web"]),
    "iss_another_string": dict(iss="https://evil.example"),
    "iss_with_trailing_slash": dict(iss="{url}/"),
    "iss_a_number": dict(iss=42),
    "iss_a_list": dict(iss=["{url}"]),
    "iss_null": dict(iss=None),
    "token_type_refresh_token": dict(token_type="refresh_token"),
    "token_type_id_token": dict(token_type="urn:ietf:params:oauth:token-type:id_token"),
    "nbf_an_hour_ahead": dict(nbf=int(time.time()) + 3600),
    "nbf_a_string": dict(nbf="0"),
    "active_false": dict(active=False),
}


def crafted(server, gateway, case):
    changes = {k: (v.replace("{url}", server.url) if isinstance(v, str) else
                   [x.replace("{url}", server.url) for x in v] if isinstance(v, list) else v)
               for k, v in CRAFTED[case].items()}
    return good_answer(server, gateway, **changes)


def test_well_formed_introspection_answer_is_accepted_control(strict_gateway, servers, orthanc):
    a, _ = servers
    token = fresh_token("good")
    a.answers[token] = good_answer(a, strict_gateway)
    assert_accepted(strict_gateway, token, orthanc)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_introspection_answer_is_refused(strict_gateway, servers, orthanc, case):
    a, _ = servers
    token = fresh_token(case)
    a.answers[token] = crafted(a, strict_gateway, case)
    asked = a.introspections()
    assert_refused(strict_gateway, token)
    assert a.introspections() > asked, "the answer was never asked for: the test proves nothing"
    # the gateway still serves a good token
    good = fresh_token("after")
    a.answers[good] = good_answer(a, strict_gateway)
    assert_accepted(strict_gateway, good, orthanc)


def test_aud_optional_issuer_accepts_no_aud_but_never_a_foreign_one(lenient_gateway, servers, orthanc):
    a, _ = servers
    token = fresh_token("no-aud-ok")
    a.answers[token] = good_answer(a, lenient_gateway, aud=DROP)
    assert_accepted(lenient_gateway, token, orthanc)
    for case in ("aud_of_someone_else", "iss_another_string", "token_type_refresh_token", "nbf_an_hour_ahead"):
        token = fresh_token(case)
        a.answers[token] = crafted(a, lenient_gateway, case)
        assert_refused(lenient_gateway, token)


@pytest.mark.parametrize("status", [307, 308, 302])
def test_introspection_redirect_is_not_followed(strict_gateway, servers, status):
    a, b = servers
    token = fresh_token(f"redirect-{status}")
    b.answers[token] = good_answer(b, strict_gateway, iss=a.url)  # what B would say if asked
    a.answers[token] = lambda: (status, [("Location", f"{b.url}/introspect")], b"")
    asked_b = b.introspections()
    r = qido(strict_gateway, token)
    assert r.status_code in (401, 503), f"{r.status_code}: {r.text[:200]}"
    assert token not in b.tokens, "the token was re-posted to the redirect target"
    assert b.introspections() == asked_b
    rj = dimse_answer(strict_gateway, token)
    assert isinstance(rj, rd.AssociateRJ), f"DIMSE: {rj}"
    assert token not in b.tokens


@pytest.mark.parametrize("opaque_on", ["a", "b"])
def test_opaque_token_goes_only_to_the_issuer_chosen_for_opaque_tokens(tmp_root, orthanc, servers, opaque_on):
    a, b = servers
    g = two_issuers(tmp_root, orthanc, servers, f"attack-trust-opaque-{opaque_on}", opaque_on)
    chosen, other = (a, b) if opaque_on == "a" else (b, a)
    try:
        # known to both, active at both: only the chosen one may be asked
        token = fresh_token("both-know-it")
        chosen.answers[token] = good_answer(chosen, g)
        other.answers[token] = good_answer(other, g)
        assert_accepted(g, token, orthanc)
        assert token in chosen.tokens
        assert token not in other.tokens, "an opaque token was offered to an issuer not chosen for opaque tokens"
        # unknown to the chosen one, "active" at the other: refused, and the other never asked
        token = fresh_token("only-other-knows")
        other.answers[token] = good_answer(other, g)
        assert_refused(g, token)
        assert token in chosen.tokens
        assert token not in other.tokens, "an opaque token was offered to an issuer not chosen for opaque tokens"
        assert requests.get(f"{g.public_url}/healthz", timeout=10).status_code == 200
    finally:
        stop(g.proc)
