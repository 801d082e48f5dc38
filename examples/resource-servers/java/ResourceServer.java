// A resource server that accepts a Keycloak access token only for its own API.
// Configuration (environment): RS_ISSUER (the realm's exact issuer URL), RS_AUDIENCE
// (this API's client id), RS_ROLE (the client role it requires), RS_AZP (the clients,
// comma-separated, whose tokens it accepts), RS_LISTEN (host:port). Each check and
// why it matters: docs/src/resource-servers.md.
import com.nimbusds.jose.JWSAlgorithm;
import com.nimbusds.jose.jwk.source.JWKSourceBuilder;
import com.nimbusds.jose.proc.JWSVerificationKeySelector;
import com.nimbusds.jose.proc.SecurityContext;
import com.nimbusds.jose.util.JSONObjectUtils;
import com.nimbusds.jwt.JWTClaimsSet;
import com.nimbusds.jwt.JWTParser;
import com.nimbusds.jwt.proc.DefaultJWTClaimsVerifier;
import com.nimbusds.jwt.proc.DefaultJWTProcessor;
import com.nimbusds.jwt.proc.ExpiredJWTException;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.text.ParseException;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Arrays;
import java.util.Set;
import java.util.stream.Collectors;
import com.nimbusds.jose.util.DefaultResourceRetriever;
import java.util.concurrent.Executors;

public class ResourceServer {
    static final String ISSUER = env("RS_ISSUER"), AUDIENCE = env("RS_AUDIENCE"), ROLE = env("RS_ROLE");
    static final Set<String> AZP = Arrays.stream(env("RS_AZP").split(",")).filter(s -> !s.isEmpty()).collect(Collectors.toUnmodifiableSet());

    static String env(String name) {
        var value = System.getenv(name);
        if (value == null || value.isEmpty()) throw new IllegalStateException("set RS_ISSUER, RS_AUDIENCE, RS_ROLE and RS_AZP");
        return value;
    }

    static class Refused extends Exception { Refused(String reason) { super(reason); } }

    public static void main(String[] args) throws Exception {
        if (AZP.isEmpty()) throw new IllegalStateException("set RS_AZP");
        // A request must arrive within 10 s: one slow client cannot hold the server.
        System.setProperty("sun.net.httpserver.maxReqTime", "10");
        System.setProperty("sun.net.httpserver.maxRspTime", "10");
        var processor = new DefaultJWTProcessor<SecurityContext>();
        // The realm's keys, cached; an unknown kid refetches them (rate-limited).
        var keys = JWKSourceBuilder.create(URI.create(ISSUER + "/protocol/openid-connect/certs").toURL(),
                new DefaultResourceRetriever(5000, 5000, 1 << 20)).build(); // 5 s, 1 MiB
        processor.setJWSKeySelector(new JWSVerificationKeySelector<>(JWSAlgorithm.RS256, keys));
        var claimsVerifier = new DefaultJWTClaimsVerifier<SecurityContext>(
                new JWTClaimsSet.Builder().issuer(ISSUER).build(), Set.of("exp", "iat", "iss"));
        claimsVerifier.setMaxClockSkew(0);
        processor.setJWTClaimsSetVerifier(claimsVerifier);

        var listen = System.getenv().getOrDefault("RS_LISTEN", "127.0.0.1:8080").split(":");
        var server = HttpServer.create(new InetSocketAddress(listen[0], Integer.parseInt(listen[1])), 0);
        server.createContext("/", exchange -> {
            var header = exchange.getRequestHeaders().getFirst("Authorization");
            try {
                if (header == null || !header.regionMatches(true, 0, "Bearer ", 0, 7)) throw new Refused("missing");
                var claims = verify(processor, header.substring(7));
                // Identity mode: the repository is the token's subject (repository_uuid).
                var body = new HashMap<String, Object>();
                body.put("client", claims.getStringClaim("azp"));
                body.put("sub", claims.getSubject());
                body.put("repository_uuid", claims.getStringClaim("repository_uuid"));
                answer(exchange, 200, JSONObjectUtils.toJSONString(body));
            } catch (Refused r) {
                exchange.getResponseHeaders().set("WWW-Authenticate", "Bearer error=\"invalid_token\"");
                answer(exchange, 401, JSONObjectUtils.toJSONString(Map.of("error", "invalid_token", "reason", r.getMessage())));
            } catch (Exception e) {
                answer(exchange, 500, "{\"error\":\"server_error\"}");
            }
        });
        server.setExecutor(Executors.newFixedThreadPool(16));
        server.start();
    }

    static JWTClaimsSet verify(DefaultJWTProcessor<SecurityContext> processor, String token) throws Exception {
        try {
            if (!JWSAlgorithm.RS256.equals(JWTParser.parse(token).getHeader().getAlgorithm()))
                throw new Refused("alg"); // never let the token choose: no none, no HS256
        } catch (ParseException e) {
            throw new Refused("malformed");
        }
        JWTClaimsSet claims;
        try {
            claims = processor.process(token, null);
        } catch (ExpiredJWTException e) {
            throw new Refused("exp");
        } catch (com.nimbusds.jwt.proc.BadJWTException e) {
            throw new Refused(e.getMessage().startsWith("JWT iss claim") ? "iss" : "claims");
        } catch (Exception e) {
            throw new Refused("signature");
        }
        if (!"Bearer".equals(claims.getStringClaim("typ"))) throw new Refused("typ"); // an ID token is not an access token
        if (!List.of(AUDIENCE).equals(claims.getAudience())) throw new Refused("aud"); // this API and no other
        var azp = claims.getClaim("azp");
        if (!(azp instanceof String client) || !AZP.contains(client)) throw new Refused("azp");
        var access = claims.getJSONObjectClaim("resource_access");
        if (access == null || !(access.get(AUDIENCE) instanceof Map<?, ?> api)
                || !(api.get("roles") instanceof List<?> roles) || !roles.contains(ROLE)) throw new Refused("role");
        return claims;
    }

    static void answer(HttpExchange exchange, int status, String body) throws java.io.IOException {
        var bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "application/json");
        exchange.sendResponseHeaders(status, bytes.length);
        try (var out = exchange.getResponseBody()) { out.write(bytes); }
    }
}
