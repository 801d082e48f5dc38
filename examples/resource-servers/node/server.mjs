// A resource server that accepts a Keycloak access token only for its own API.
// Configuration (environment): RS_ISSUER (the realm's exact issuer URL), RS_AUDIENCE
// (this API's client id), RS_ROLE (the client role it requires), RS_AZP (the clients,
// comma-separated, whose tokens it accepts), RS_LISTEN (host:port). Each check and
// why it matters: docs/src/resource-servers.md.
import http from "node:http";
import { createRemoteJWKSet, decodeProtectedHeader, errors, jwtVerify } from "jose";

const { RS_ISSUER: ISSUER, RS_AUDIENCE: AUDIENCE, RS_ROLE: ROLE } = process.env;
const AZP = new Set((process.env.RS_AZP ?? "").split(",").filter(Boolean));
if (!ISSUER || !AUDIENCE || !ROLE || !AZP.size) throw new Error("set RS_ISSUER, RS_AUDIENCE, RS_ROLE and RS_AZP");
const LISTEN = process.env.RS_LISTEN ?? "127.0.0.1:8080";
const [HOST, PORT] = [LISTEN.slice(0, LISTEN.lastIndexOf(":")), LISTEN.slice(LISTEN.lastIndexOf(":") + 1)];
// The realm's keys, cached; an unknown kid refetches them at most every 30 s.
const JWKS = createRemoteJWKSet(new URL(`${ISSUER}/protocol/openid-connect/certs`), {
  timeoutDuration: 5000,
  cooldownDuration: 30000,
});

class Refused extends Error {}

async function verify(token) {
  let alg;
  try {
    alg = decodeProtectedHeader(token).alg;
  } catch {
    throw new Refused("malformed");
  }
  if (alg !== "RS256") throw new Refused("alg"); // never let the token choose
  let claims;
  try {
    ({ payload: claims } = await jwtVerify(token, JWKS, {
      issuer: ISSUER,
      algorithms: ["RS256"],
      requiredClaims: ["exp", "iat"],
    }));
  } catch (e) {
    if (e instanceof errors.JWTExpired) throw new Refused("exp");
    if (e instanceof errors.JWTClaimValidationFailed && e.claim === "iss") throw new Refused("iss");
    if (e instanceof errors.JWSSignatureVerificationFailed || e instanceof errors.JWKSNoMatchingKey)
      throw new Refused("signature");
    throw new Refused("claims");
  }
  if (claims.typ !== "Bearer") throw new Refused("typ"); // an ID token is not an access token
  const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (aud.length !== 1 || aud[0] !== AUDIENCE) throw new Refused("aud"); // this API and no other
  if (typeof claims.azp !== "string" || !AZP.has(claims.azp)) throw new Refused("azp");
  const roles = Object.hasOwn(claims.resource_access ?? {}, AUDIENCE) ? claims.resource_access[AUDIENCE]?.roles : null;
  if (!Array.isArray(roles) || !roles.includes(ROLE)) throw new Refused("role"); // a list: "rewriter" holds "write"
  return claims;
}

function answer(res, status, body) {
  const headers = { "Content-Type": "application/json" };
  if (status === 401) headers["WWW-Authenticate"] = 'Bearer error="invalid_token"';
  res.writeHead(status, headers).end(JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
    const [scheme, token] = (req.headers.authorization ?? "").split(" ");
    try {
      if (scheme?.toLowerCase() !== "bearer" || !token) throw new Refused("missing");
      const claims = await verify(token);
      // Identity mode: the repository is the token's subject (repository_uuid).
      answer(res, 200, { client: claims.azp, sub: claims.sub, repository_uuid: claims.repository_uuid ?? null });
    } catch (e) {
      if (!(e instanceof Refused)) return answer(res, 500, { error: "server_error" });
      answer(res, 401, { error: "invalid_token", reason: e.message });
    }
});
server.requestTimeout = 10000; // a request must arrive within 10 s: a slow client cannot hold it
server.headersTimeout = 5000;
server.listen(Number(PORT), HOST);
