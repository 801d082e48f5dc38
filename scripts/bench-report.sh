#!/usr/bin/env bash
# The access report over a multi-GB audit input (issue #23): writes GB gigabytes
# of audit lines (default 3) as rotation leaves them (the older half gzip-
# compressed, the newer plain, one overlapping line), then runs
# `report access --format json` over them and prints the time, the peak RSS and
# the audit counts. The input is generated under target/ and removed after.
#
#   bash scripts/bench-report.sh [GB]
set -euo pipefail
cd "$(dirname "$0")/.."
gb=${1:-3}
out=target/bench-report
rm -rf "$out" && mkdir -p "$out"
trap 'rm -rf "$out/audit.jsonl" "$out/audit.jsonl.1.gz"' EXIT

cargo build --release --locked --bin keycloak-ci-sts >/dev/null 2>&1
# Lines like the service's (about 900 bytes), over 20,000 repositories.
python3 - "$gb" "$out" <<'EOF'
import gzip, sys, uuid
gb, out = float(sys.argv[1]), sys.argv[2]
line = ('{{"time":{t},"request_id":"{rid:032x}","client_address":"10.0.0.1","event":"exchange","outcome":"{o}",'
        '"error_code":{code},"issuer":"https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",'
        '"sub":"{{r}}:{{s}}","workspaceUuid":"{{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}}","repositoryUuid":"{{00000000-0000-4000-8000-{r:012x}}}",'
        '"repository_full_name":"acme/repo-{r}","pipelineUuid":"{{p}}","stepUuid":"{{s}}","deploymentEnvironmentUuid":null,'
        '"branchName":"main","policy":"p{pol}","keycloak_client":"sts-deploy","audience":"deploy-api","requested_scopes":[],'
        '"granted_scopes":["deploy:production"],"expires_in":300,"token_sha256":"{rid:064x}","token_jti":"{rid:032x}"}}\n')
target = int(gb * 1024**3)
half = target // 2
t0, n, written = 1_780_000_000, 0, 0
def lines(limit):
    global n, written
    while written < limit:
        n += 1
        ok = n % 10 != 0
        s = line.format(t=t0 + n // 50, rid=n, o="allowed" if ok else "denied",
                        code="null" if ok else '"policy.branch_not_allowed"', r=n % 20000, pol=n % 5000)
        written += len(s)
        yield s
with gzip.open(f"{out}/audit.jsonl.1.gz", "wt", compresslevel=1) as f:
    for s in lines(half):
        f.write(s)
        last = s
with open(f"{out}/audit.jsonl", "w") as f:
    f.write(last)  # the overlap rotation can leave
    for s in lines(target):
        f.write(s)
EOF
ls -l "$out"
/usr/bin/time -v target/release/keycloak-ci-sts report access --dir policies \
  --audit "$out/audit.jsonl" --audit "$out/audit.jsonl.1.gz" \
  --since 2026-01-01 --until 2027-01-01 --format json --out "$out/report.json" 2> "$out/time.txt"
grep -E "audit:|Elapsed|Maximum resident" "$out/time.txt"
