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

ISSUER = os.environ["RS_ISSUER"]
AUDIENCE = os.environ["RS_AUDIENCE"]
ROLE = os.environ["RS_ROLE"]
AZP = set(os.environ["RS_AZP"].split(","))
HOST, PORT = os.environ.get("RS_LISTEN", "127.0.0.1:8080").rsplit(":", 1)
# The realm's keys, cached; an unknown kid refetches them (the realm rotated).
JWKS = jwt.PyJWKClient(f"{ISSUER}/protocol/openid-connect/certs", lifespan=300, timeout=5)


class Refused(Exception):
    """The token is not acceptable; the argument names the failed check."""


def verify(token):
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.DecodeError:
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
    except (jwt.PyJWKClientError, jwt.InvalidSignatureError):
        raise Refused("signature")
    except jwt.InvalidTokenError:
        raise Refused("claims")
    if claims.get("typ") != "Bearer":  # an ID token is not an access token
        raise Refused("typ")
    aud = claims.get("aud")
    if (aud if isinstance(aud, list) else [aud]) != [AUDIENCE]:  # this API and no other
        raise Refused("aud")
    if claims.get("azp") not in AZP:
        raise Refused("azp")
    roles = claims.get("resource_access", {}).get(AUDIENCE, {}).get("roles", [])
    if ROLE not in roles:
        raise Refused("role")
    return claims


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token:
                raise Refused("missing")
            claims = verify(token)
        except Refused as refused:
            return self.answer(401, {"error": "invalid_token", "reason": refused.args[0]})
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
