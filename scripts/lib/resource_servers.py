"""Runs the resource-server kit (examples/resource-servers/) against the real
Keycloak with tokens obtained through the running keycloak-ci-sts, and checks
that each server accepts the right token and refuses each wrong one for the
right reason. Called by scripts/resource-servers.sh, which prepares the
runtimes and starts the service; argv[1] is a JSON list of
{"lang", "cmd", "cwd"}. Prints a table; exits 1 on any mismatch.
"""
import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

KC = os.environ["KC_URL"]
REALM = f"{KC}/realms/ci"
STS = os.environ["STS_URL"]
ISSUER = os.environ["ISSUER_URL"]
WS = os.environ["WORKSPACE_UUID"]
DEPLOY_REPO = os.environ["REPOSITORY_UUID"]
WEB_REPO = os.environ["WEB_REPOSITORY_UUID"]
PRODUCTION = os.environ["PRODUCTION_ENV_UUID"]
TIMEOUT = 10


def post(url, data, headers=None):
    body = data if isinstance(data, bytes) else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(url, body, headers or {})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.load(r)


def step_token(repo, branch, env=None):
    step = {"workspace": "acme", "workspace_uuid": WS, "repository_uuid": repo,
            "branch_name": branch, "audiences": ["https://sts.example.test"]}
    if env:
        step["deployment_environment_uuid"] = env
    req = urllib.request.Request(f"{ISSUER}/mint", json.dumps(step).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.read().decode().strip()


def exchange(subject, audience, scope=None):
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "subject_token": subject, "audience": audience}
    if scope:
        form["scope"] = scope
    try:
        return post(f"{STS}/token", form)["access_token"]
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")[:500]
        sys.exit(f"resource servers: the service refused {audience} {scope or ''}: HTTP {e.code} {body}; "
                 "keycloak.client_rejected means realm ci's clients do not point at this service "
                 "(demo/sts.toml): run scripts/keycloak.sh provision")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(token):
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def forged(token, header, key):
    """The token's claims under a new header, HMAC-signed with key (or unsigned)."""
    head = b64(json.dumps(header).encode())
    signing_input = f"{head}.{token.split('.')[1]}"
    sig = b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing_input}.{sig}"


def realm_public_pem(kid):
    with urllib.request.urlopen(f"{REALM}/protocol/openid-connect/certs", timeout=TIMEOUT) as r:
        jwk = next(k for k in json.load(r)["keys"] if k["kid"] == kid)
    return RSAAlgorithm.from_jwk(json.dumps(jwk)).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def tokens():
    """(case, token, expected) for the artifact-api server, and the identity cases."""
    deploy_step = step_token(DEPLOY_REPO, "main", PRODUCTION)
    build_step = step_token(DEPLOY_REPO, "main")
    good = exchange(build_step, "artifact-api", "artifacts:read artifacts:write")
    header = json.loads(base64.urlsafe_b64decode(good.split(".")[0] + "=="))
    sig = good.rsplit(".", 1)[1]
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    other_realm = post(f"{KC}/realms/prov/protocol/openid-connect/token",
                       {"grant_type": "client_credentials", "client_id": "kcs-admin-view",
                        "client_secret": "kcs-admin-view-test-secret"})["access_token"]
    # Same realm, same key, another issuer: Keycloak names the issuer after the
    # Host it was asked on (its frontend URL is not fixed here).
    host = urllib.parse.urlsplit(KC).port
    other_issuer = post(f"{REALM}/protocol/openid-connect/token",
                        {"grant_type": "client_credentials", "client_id": "kcs-admin-view",
                         "client_secret": "kcs-admin-view-test-secret"},
                        {"Host": f"localhost:{host}"})["access_token"]
    if claims(other_issuer)["iss"] == REALM:
        sys.exit("resource servers: Keycloak named the same issuer for another Host; the iss case needs another")
    id_token = post(f"{REALM}/protocol/openid-connect/token",
                    {"grant_type": "client_credentials", "client_id": "kcs-admin-view",
                     "client_secret": "kcs-admin-view-test-secret", "scope": "openid"})["id_token"]
    cases = [
        ("accepted: artifact-api token with the write role", good, "ok"),
        ("no Authorization header", None, "missing"),
        ("another audience (the deploy-api token)", exchange(deploy_step, "deploy-api", "deploy:production"), "aud"),
        ("missing role (artifacts:read only)", exchange(build_step, "artifact-api"), "role"),
        ("azp outside the list (sts-deploy's artifact token)", exchange(deploy_step, "deploy-api", "artifacts:read"), "azp"),
        ("two audiences (deploy-api and artifact-api in one token)",
         exchange(deploy_step, "deploy-api", "deploy:production artifacts:read"), "aud"),
        ("a token of another realm", other_realm, "signature"),
        ("the realm's key, another issuer (Host: localhost)", other_issuer, "iss"),
        ("altered signature", good.rsplit(".", 1)[0] + "." + flipped, "signature"),
        ("alg: none", forged(good, {**header, "alg": "none"}, None), "alg"),
        ("HS256 signed with the realm's public key", forged(good, {**header, "alg": "HS256"}, realm_public_pem(header["kid"])), "alg"),
        ("the realm's ID token", id_token, "typ"),
    ]
    identity = exchange(step_token(WEB_REPO, "main"), "release-api")
    return cases, identity


def call(port, token):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/deploy")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def start(server, port, env):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"{server['lang']}: something already listens on {port}")
    proc = subprocess.Popen(server["cmd"], cwd=server["cwd"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **env, "RS_LISTEN": f"127.0.0.1:{port}",
                                                         "RS_ISSUER": REALM})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{server['lang']}: exited at start: {proc.stderr.read().decode()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0 and proc.poll() is None:
                return proc
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"{server['lang']}: did not listen on {port} within 60 s")


def inspect(token, expected):
    """`keycloak-ci-sts token inspect` on the same token: the reason it gives is
    the servers' for every check it makes (azp and the role are the API's own);
    the token never appears in its output."""
    cmd = [os.environ["STS_BIN"], "token", "inspect", "--realm", REALM,
           "--audience", "artifact-api", "--audit", os.environ["AUDIT_FILE"], "--json"]
    out = subprocess.run(cmd, input=token.encode(), capture_output=True, timeout=60)
    if token.split(".")[2] and token.split(".")[2] in (out.stdout + out.stderr).decode():
        return "the token (its signature) was printed"
    if out.returncode not in (0, 1):
        return f"exit {out.returncode}: {out.stderr.decode()[-300:]}"
    report = json.loads(out.stdout)
    refused = report["verification"]["refused"] or "ok"
    want = "ok" if expected in ("azp", "role") else expected
    if refused != want or (out.returncode == 1) != (want != "ok"):
        return f"inspect said {refused} (exit {out.returncode}), expected {want}"
    if expected == "ok" and (report.get("audit") or {}).get("policy") != "artifacts-publish":
        return f"inspect found no audit line naming the policy: {report.get('audit')}"
    return None


def stop(proc):
    proc.kill()
    proc.wait(timeout=TIMEOUT)


def outcome(status, body):
    return "ok" if status == 200 else body.get("reason", f"HTTP {status}") if status == 401 else f"HTTP {status}"


def main():
    servers = json.loads(sys.argv[1])
    cases, identity = tokens()
    expiring = cases[0][1]
    failures, rows = [], {}
    for i, server in enumerate(servers):
        lang, port = server["lang"], 18131 + i
        proc = start(server, port, {"RS_AUDIENCE": "artifact-api", "RS_ROLE": "write", "RS_AZP": "sts-artifacts"})
        try:
            for name, token, expected in cases:
                got = outcome(*call(port, token))
                rows.setdefault(name, {})[lang] = got
                if got != expected:
                    failures.append(f"{lang}: {name}: expected {expected}, got {got}")
        finally:
            stop(proc)
        proc = start(server, port, {"RS_AUDIENCE": "release-api", "RS_ROLE": "read", "RS_AZP": "sts-repo"})
        try:
            status, body = call(port, identity)
            got = "ok" if status == 200 and body.get("repository_uuid") == WEB_REPO else outcome(status, body)
            rows.setdefault("identity mode: acme/web's own token, repository_uuid read", {})[lang] = got
            if got != "ok":
                failures.append(f"{lang}: identity mode: got {got} {body}")
        finally:
            stop(proc)
    # token inspect on the same tokens, while the accepted one is still valid.
    for name, token, expected in cases:
        if token is None:
            continue
        problem = inspect(token, expected)
        shown = {"ok": "ok", "azp": "ok (azp shown, not judged)", "role": "ok (roles shown, not judged)"}
        rows[name]["token inspect"] = problem or shown.get(expected, expected)
        if problem:
            failures.append(f"token inspect: {name}: {problem}")
    # Last, once every other case has run: the first token, now expired.
    exp = claims(expiring)["exp"]
    while time.time() <= exp + 1:
        time.sleep(min(1.0, exp + 1.05 - time.time()))
    for i, server in enumerate(servers):
        lang, port = server["lang"], 18131 + i
        proc = start(server, port, {"RS_AUDIENCE": "artifact-api", "RS_ROLE": "write", "RS_AZP": "sts-artifacts"})
        try:
            got = outcome(*call(port, expiring))
        finally:
            stop(proc)
        rows.setdefault("expired (the accepted token, after its exp)", {})[lang] = got
        if got != "exp":
            failures.append(f"{lang}: expired: expected exp, got {got}")
    problem = inspect(expiring, "exp")
    rows.setdefault("expired (the accepted token, after its exp)", {})["token inspect"] = problem or "exp"
    if problem:
        failures.append(f"token inspect: expired: {problem}")
    langs = [s["lang"] for s in servers] + ["token inspect"]
    print("| case | " + " | ".join(langs) + " |")
    print("|---|" + "---|" * len(langs))
    for name, by_lang in rows.items():
        print(f"| {name} | " + " | ".join(by_lang.get(l, "-") for l in langs) + " |")
    if failures:
        sys.exit("resource servers: " + "; ".join(failures))
    print(f"resource servers: {len(servers)} languages and token inspect, {len(rows)} cases, as expected")


main()
