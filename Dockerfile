# keycloak-ci-sts container image: release build, minimal runtime, non-root.
#
#   docker build -t keycloak-ci-sts .
#   docker run --read-only --user 65532:65532 -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "/srv/keycloak-ci-sts:/etc/keycloak-ci-sts:ro" keycloak-ci-sts
#
# (/srv/keycloak-ci-sts: sts.toml with listen/admin_listen on 0.0.0.0:8080/9090,
# policies/, keys readable by uid 65532, e.g. chown 65532 key.pem && chmod 0400.) The apt versions are pinned for a reproducible image; a
# Debian security update retires them: bump them then (hadolint DL3008).
#
# Configuration and policies are mounted at /etc/keycloak-ci-sts (read-only);
# secrets come from files under it or from environment variables the
# configuration names (secret_env, key_env, url_env). No HEALTHCHECK: the
# orchestrator probes GET /healthz (liveness) and GET /readyz (readiness) on
# admin_listen (docs/src/deploying.md). The root filesystem can be read-only: the
# service writes nothing but its audit log (standard output by default).
# Checked with hadolint in .ci/run; scripts/deploy-check.sh runs the release
# binary exactly as ENTRYPOINT/CMD below do (no container engine there).

FROM rust:1.95.0-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config=1.8.1-1 libssl-dev=3.0.22-1~deb12u2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY testkit ./testkit
COPY benches ./benches
COPY bench/floor ./bench/floor
# The release build of scripts/release.sh (Cargo profile `dist`, under
# cargo-auditable: the binary carries its dependency list for `cargo audit bin`
# and SBOM tools). deploy-check.sh checks that the files copied above form the
# workspace.
RUN cargo install --locked --version 0.7.7 cargo-auditable
# `keycloak-ci-sts --version` names the commit given here:
#   docker build --build-arg KCS_GIT_COMMIT="$(git rev-parse HEAD)" ...
ARG KCS_GIT_COMMIT
RUN cargo auditable build --profile dist --locked --bin keycloak-ci-sts

FROM debian:12.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20250419~deb12u2 libssl3=3.0.22-1~deb12u2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 sts \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sts
COPY --from=build /src/target/dist/keycloak-ci-sts /usr/local/bin/keycloak-ci-sts
USER 65532:65532
WORKDIR /etc/keycloak-ci-sts
ENV RUST_LOG=info
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/keycloak-ci-sts"]
CMD ["serve", "--config", "/etc/keycloak-ci-sts/sts.toml"]
