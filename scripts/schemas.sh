#!/usr/bin/env bash
# Validates files against the committed JSON Schemas (docs/src/schemas/; run by
# scripts/test.sh). tests/api/schemas.rs checks that each committed schema is
# what the types generate and that the loader agrees with the cases below.
#
#   scripts/schemas.sh
#
# - every shipped example validates: policies/*.yaml against policy.schema.json,
#   policies/inventory/*.yaml against inventory.schema.json,
#   policies/keycloak/realm.yaml against realm-model.schema.json, demo/sts.toml
#   and deploy/sts.example.toml against configuration.schema.json;
# - every case in tests/fixtures/schema/<kind>/accepted validates and every case
#   in .../rejected (each breaks one rule the loader refuses) does not.
# Draft-07 (what yaml-language-server and taplo read), with Python's jsonschema
# 4.26.0 and ruamel.yaml 0.18.16 (YAML 1.2) from PyPI in a virtualenv cached
# outside the clone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE="${KCS_CACHE:-$HOME/.cache/keycloak-ci-sts}"
# Every package pinned, the transitive ones too (installed with --no-deps).
PINS=(jsonschema==4.26.0 attrs==26.1.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1 typing_extensions==4.16.0 ruamel.yaml==0.18.16)
VENV="$CACHE/pytools-schemas-$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import jsonschema, ruamel.yaml' 2>/dev/null; then
  echo "schemas: installing ${PINS[*]} (cached in $VENV)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-deps "${PINS[@]}"
fi

# The summary line is required: an interpreter that exits 0 without checking
# (a damaged or tampered cache) fails the step.
summary=$("$VENV/bin/python" - <<'PY'
import glob, json, os, sys
import jsonschema
from ruamel.yaml import YAML

import tomllib

def load(path):
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            return tomllib.load(f)
    with open(path) as f:
        # YAML 1.2, as the loader and yaml-language-server read it (`yes`, `on`
        # and `no` are strings, not booleans as in PyYAML's YAML 1.1).
        return YAML(typ="safe", pure=True).load(f)

failures = []
def check(kind, files, want_valid):
    schema = json.load(open(f"docs/src/schemas/{kind}.schema.json"))
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for path in sorted(files):
        errors = list(validator.iter_errors(load(path)))
        if want_valid and errors:
            failures.append(f"{path}: not valid against {kind}.schema.json: {errors[0].message}")
        if not want_valid and not errors:
            failures.append(f"{path}: a rejected case that {kind}.schema.json accepts")
    return len(files)

n = 0
for kind, examples in [
    ("policy", glob.glob("policies/*.yaml")),
    ("inventory", glob.glob("policies/inventory/*.yaml")),
    ("realm-model", glob.glob("policies/keycloak/realm.yaml")),
    ("configuration", ["demo/sts.toml", "deploy/sts.example.toml"]),
]:
    n += check(kind, examples, True)
    n += check(kind, glob.glob(f"tests/fixtures/schema/{kind}/accepted/*.*"), True)
    n += check(kind, glob.glob(f"tests/fixtures/schema/{kind}/rejected/*.*"), False)
for f in failures:
    print("schemas: " + f, file=sys.stderr)
if failures:
    sys.exit(1)
print(f"schemas: {n} files checked against docs/src/schemas/")
PY
)
echo "$summary"
grep -qE '^schemas: [1-9][0-9]* files checked' <<<"$summary" || { echo "schemas: the validator printed no summary; is $VENV intact?" >&2; exit 1; }
