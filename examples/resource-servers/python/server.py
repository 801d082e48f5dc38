"""A resource server that accepts a Keycloak access token only for its own API.

Configuration (environment): RS_ISSUER (the realm's exact issuer URL), RS_AUDIENCE
(this API's client id), RS_ROLE (the client role it requires), RS_AZP (the clients,
comma-separated, whose tokens it accepts), RS_LISTEN (host:port). Each check and
why it matters: docs/src/resource-servers.md.
"""
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt

ISSUER, AUDIENCE, ROLE = (os.environ.get(k, "") for k in ("RS_ISSUER", "RS_AUDIENCE", "RS_ROLE"))
AZP = {a for a in os.environ.get("RS_AZP", "").split(",") if a}
if not (ISSUER and AUDIENCE and ROLE and AZP):  # not assert: python -O drops it
    raise SystemExit("set RS_ISSUER, RS_AUDIENCE, RS_ROLE and RS_AZP")
HOST, PORT = os.environ.get("RS_LISTEN", "127.0.0.1:8080").rsplit(":", 1)
# The realm's keys, cached; an unknown kid refetches them (the realm rotated).
JWKS = jwt.PyJWKClient(f"{ISSUER}/protocol/openid-connect/certs", lifespan=300, timeout=5)


class Refused(Exception):
    """The token is not acceptable; the argument names the failed check."""


def verify(token):
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise Refused("malformed")
    if alg != "RS256":  # never let the token choose: no none, no HS256
        raise Refused("alg")
    try:
        key = JWKS.get_signing_key_from_jwt(token).key
        claims = jwt.decode(token, key, algorithms=["RS256"], issuer=ISSUER,
                            options={"require": ["exp", "iat", "iss"], "verify_aud": False})
    except jwt.ExpiredSignatureError:
        raise Refused("exp")
    except jwt.InvalidIssuerError:
        raise Refused("iss")
    except (jwt.PyJWKClientError, jwt.InvalidSignatureError, jwt.InvalidKeyError):
        raise Refused("signature")
    except jwt.PyJWTError:
        raise Refused("claims")
    if not all(isinstance(claims.get(c), int) for c in ("exp", "iat")):  # PyJWT takes "123"
        raise Refused("claims")
    if claims.get("typ") != "Bearer":  # an ID token is not an access token
        raise Refused("typ")
    aud = claims.get("aud")
    if (aud if isinstance(aud, list) else [aud]) != [AUDIENCE]:  # this API and no other
        raise Refused("aud")
    if not isinstance(claims.get("azp"), str) or claims["azp"] not in AZP:
        raise Refused("azp")
    access = claims.get("resource_access")
    api = access.get(AUDIENCE) if isinstance(access, dict) else None
    roles = api.get("roles") if isinstance(api, dict) else None
    if not isinstance(roles, list) or ROLE not in roles:  # a list: "rewriter" holds "write"
        raise Refused("role")
    return claims


class Handler(BaseHTTPRequestHandler):
    timeout = 10  # seconds to send a request: a slow client holds one thread, not forever

    def do_GET(self):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token:
                raise Refused("missing")
            claims = verify(token)
        except Refused as refused:
            return self.answer(401, {"error": "invalid_token", "reason": refused.args[0]})
        except Exception:  # never a traceback with request data in the log
            return self.answer(500, {"error": "server_error"})
        # Identity mode: the repository is the token's subject (repository_uuid).
        self.answer(200, {"client": claims["azp"], "sub": claims.get("sub"),
                          "repository_uuid": claims.get("repository_uuid")})

    def answer(self, status, body):
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):  # never log requests: they carry tokens
        pass


ThreadingHTTPServer((HOST, int(PORT)), Handler).serve_forever()
