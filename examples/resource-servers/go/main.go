// A resource server that accepts a Keycloak access token only for its own API.
// Configuration (environment): RS_ISSUER (the realm's exact issuer URL), RS_AUDIENCE
// (this API's client id), RS_ROLE (the client role it requires), RS_AZP (the clients,
// comma-separated, whose tokens it accepts), RS_LISTEN (host:port). Each check and
// why it matters: docs/src/resource-servers.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
)

type refused string

func (r refused) Error() string { return string(r) }

func main() {
	issuer, audience, role := os.Getenv("RS_ISSUER"), os.Getenv("RS_AUDIENCE"), os.Getenv("RS_ROLE")
	azp := slices.DeleteFunc(strings.Split(os.Getenv("RS_AZP"), ","), func(s string) bool { return s == "" })
	if issuer == "" || audience == "" || role == "" || len(azp) == 0 {
		panic("set RS_ISSUER, RS_AUDIENCE, RS_ROLE and RS_AZP")
	}
	// The realm's keys, cached and refreshed; an unknown kid refetches them, rate-limited.
	keys, err := keyfunc.NewDefaultOverrideCtx(context.Background(), []string{issuer + "/protocol/openid-connect/certs"},
		keyfunc.Override{HTTPTimeout: 5 * time.Second, RateLimitWaitMax: 5 * time.Second}) // never hangs a request
	if err != nil {
		panic(err)
	}
	parser := jwt.NewParser(jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer(issuer),
		jwt.WithExpirationRequired(), jwt.WithIssuedAt())

	verify := func(raw string) (jwt.MapClaims, error) {
		unverified, _, err := jwt.NewParser().ParseUnverified(raw, jwt.MapClaims{})
		if err != nil {
			return nil, refused("malformed")
		}
		if unverified.Header["alg"] != "RS256" { // never let the token choose: no none, no HS256
			return nil, refused("alg")
		}
		if _, crit := unverified.Header["crit"]; crit { // an extension we do not understand
			return nil, refused("malformed")
		}
		claims := jwt.MapClaims{}
		_, err = parser.ParseWithClaims(raw, claims, keys.Keyfunc)
		switch {
		case errors.Is(err, jwt.ErrTokenExpired):
			return nil, refused("exp")
		case errors.Is(err, jwt.ErrTokenInvalidIssuer):
			return nil, refused("iss")
		case errors.Is(err, jwt.ErrTokenSignatureInvalid), errors.Is(err, jwt.ErrTokenUnverifiable):
			return nil, refused("signature")
		case err != nil, claims["iat"] == nil:
			return nil, refused("claims")
		}
		if claims["typ"] != "Bearer" { // an ID token is not an access token
			return nil, refused("typ")
		}
		if aud, _ := claims.GetAudience(); len(aud) != 1 || aud[0] != audience { // this API and no other
			return nil, refused("aud")
		}
		if client, _ := claims["azp"].(string); !slices.Contains(azp, client) {
			return nil, refused("azp")
		}
		access, _ := claims["resource_access"].(map[string]any)
		api, _ := access[audience].(map[string]any)
		roles, _ := api["roles"].([]any)
		if !slices.Contains(roles, any(role)) {
			return nil, refused("role")
		}
		return claims, nil
	}

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		scheme, raw, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		err := error(refused("missing"))
		var claims jwt.MapClaims
		if strings.EqualFold(scheme, "Bearer") && raw != "" {
			claims, err = verify(raw)
		}
		if err != nil {
			reason := err.Error()
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			w.WriteHeader(http.StatusUnauthorized)
			json.NewEncoder(w).Encode(map[string]string{"error": "invalid_token", "reason": reason})
			return
		}
		// Identity mode: the repository is the token's subject (repository_uuid).
		json.NewEncoder(w).Encode(map[string]any{"client": claims["azp"], "sub": claims["sub"], "repository_uuid": claims["repository_uuid"]})
	})
	listen := os.Getenv("RS_LISTEN")
	if listen == "" {
		listen = "127.0.0.1:8080"
	}
	server := &http.Server{Addr: listen, Handler: handler,
		ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, IdleTimeout: 30 * time.Second}
	panic(server.ListenAndServe())
}
