#!/usr/bin/env python3
"""A synthetic organisation in the real inventory and policy formats (issue #20).

    bench/scale/generate.py N P OUT_DIR

writes OUT_DIR/inventory/acme.yaml (one workspace, N repositories in 50
projects, each with a Production and a Staging environment) and P policy files:

- per-repository allows by name (`workspace`, `repository`, `deploymentEnvironment:
  Production`, `branchName: main`, client sts-deploy, audience deploy-api), the bulk;
- project-wide globs (`repository: acme/p07-*`, `branchName: main`, client
  sts-artifacts, audience artifact-api), one per project;
- a few denies (an exact repository, a branch pattern for every audience, the
  agent marker on deploy:production);
- identity grants (client sts-repo, JWT Authorization Grant, identity repository);
- agent-marked allows (`aud` marker, artifact-api).

Repository 0 is the one the benchmark's tokens name: REPOSITORY_UUID, with the
Production environment PRODUCTION_UUID of scripts/bench-cpu.sh. Deterministic:
the same arguments write the same files.
"""

import os
import sys
import uuid

WORKSPACE = "acme"
WORKSPACE_UUID = "{03b741e3-cf4a-41f9-9a59-cec52e21bdc3}"
REPOSITORY_UUID = "{d4e45493-4a33-477d-917b-a24e7e4bd39b}"
PRODUCTION_UUID = "{bd715740-c970-486b-b68a-b421ec2a1f8b}"
PROJECTS = 50
NS = uuid.UUID("6f1c8a52-3d0e-4b7a-9e21-5c4d3b2a1f00")
MARKER = "https://sts.example.test/agent"


def u(*parts):
    return "{%s}" % uuid.uuid5(NS, "/".join(str(p) for p in parts))


def repo_name(i):
    return "%s/p%02d-repo-%05d" % (WORKSPACE, i % PROJECTS, i)


def inventory(n):
    rows = []
    for i in range(n):
        ruuid = REPOSITORY_UUID if i == 0 else u("repo", i)
        prod = PRODUCTION_UUID if i == 0 else u("env", i, "Production")
        envs = sorted([(prod, "Production"), (u("env", i, "Staging"), "Staging")])
        rows.append((ruuid, repo_name(i), i % PROJECTS, envs))
    rows.sort()
    out = [
        "# Bitbucket inventory of workspace `acme`, written by bench/scale/generate.py.\n",
        "workspace: %s\n" % WORKSPACE,
        "workspace_uuid: '%s'\n" % WORKSPACE_UUID,
        "repositories:\n",
    ]
    for ruuid, name, project, envs in rows:
        out.append("- uuid: '%s'\n  full_name: %s\n" % (ruuid, name))
        out.append("  project:\n    key: P%02d\n    uuid: '%s'\n" % (project, u("project", project)))
        out.append("  environments:\n")
        for euuid, ename in envs:
            out.append("  - uuid: '%s'\n    name: %s\n" % (euuid, ename))
    return "".join(out)


def per_repository(i):
    return (
        "description: %s, main, Production -> deploy-api\n"
        "effect: allow\n"
        "when:\n"
        "  workspace: %s\n"
        "  repository: %s\n"
        "  deploymentEnvironment: Production\n"
        "  branchName: main\n"
        "grant:\n"
        "  client: sts-deploy\n"
        "  audience: deploy-api\n"
        "  scopes: [deploy:production, artifacts:read]\n"
        "  default_scopes: [deploy:production]\n"
        "  max_lifetime_seconds: 300\n" % (repo_name(i), WORKSPACE, repo_name(i))
    )


def project_glob(p):
    return (
        "description: every repository of project P%02d, main -> artifact-api\n"
        "effect: allow\n"
        "when:\n"
        "  workspace: %s\n"
        "  repository: \"%s/p%02d-*\"\n"
        "  branchName: main\n"
        "grant:\n"
        "  client: sts-artifacts\n"
        "  audience: artifact-api\n"
        "  scopes: [artifacts:read]\n"
        "  default_scopes: [artifacts:read]\n"
        "  max_lifetime_seconds: 600\n" % (p, WORKSPACE, WORKSPACE, p)
    )


def identity(i):
    return (
        "description: %s's own Keycloak user, main\n"
        "effect: allow\n"
        "when:\n"
        "  workspace: %s\n"
        "  repository: %s\n"
        "  branchName: main\n"
        "grant:\n"
        "  client: sts-repo\n"
        "  audience: repo-api\n"
        "  scopes: [repo:read]\n"
        "  default_scopes: [repo:read]\n"
        "  max_lifetime_seconds: 300\n"
        "  identity: repository\n" % (repo_name(i), WORKSPACE, repo_name(i))
    )


def agent(p):
    return (
        "description: agent-marked steps of project P%02d read artifacts, main\n"
        "effect: allow\n"
        "when:\n"
        "  workspace: %s\n"
        "  repository: \"%s/p%02d-*\"\n"
        "  branchName: main\n"
        "  aud: \"%s\"\n"
        "grant:\n"
        "  client: sts-artifacts\n"
        "  audience: artifact-api\n"
        "  scopes: [artifacts:read]\n"
        "  default_scopes: [artifacts:read]\n"
        "  max_lifetime_seconds: 300\n" % (p, WORKSPACE, WORKSPACE, p, MARKER)
    )


DENIES = {
    "deny-wip-branches": "description: no credentials for wip branches\neffect: deny\nwhen:\n"
    "  workspace: %s\n  branchName: \"wip/**\"\n" % WORKSPACE,
    "deny-agent-deploy": "description: agent-marked steps never deploy\neffect: deny\nwhen:\n"
    "  workspace: %s\n  aud: \"%s\"\naudiences: [deploy-api]\nscopes: [deploy:production]\n"
    % (WORKSPACE, MARKER),
}


def policies(n, p):
    """(file stem, text) for P policies: denies, project globs and agent
    allows (one per project, while P allows), identity grants (1 %), the rest
    per repository."""
    out = []
    for stem, text in DENIES.items():
        if len(out) < p:
            out.append((stem, text))
    if n > 1 and len(out) < p:
        out.append(("deny-repo-%05d" % (n - 1), "description: a retired repository\neffect: deny\n"
                    "when:\n  workspace: %s\n  repository: %s\n" % (WORKSPACE, repo_name(n - 1))))
    room = p - len(out)
    globs = min(PROJECTS, max(0, room // 10))
    for k in range(globs):
        out.append(("project-p%02d-artifacts" % k, project_glob(k)))
        out.append(("project-p%02d-agents" % k, agent(k)))
    room = p - len(out)
    identities = min(room // 100, n)
    for k in range(identities):
        out.append(("identity-%05d" % k, identity(k)))
    room = p - len(out)
    for k in range(min(room, n)):
        out.append(("repo-%05d-deploy" % k, per_repository(k)))
    return out[:p]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    n, p, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if n < 1 or p < 1 or p > n + 2 * PROJECTS + 3:
        sys.exit("need 1 <= N and 1 <= P <= N + 103")
    os.makedirs(os.path.join(out, "inventory"), exist_ok=True)
    with open(os.path.join(out, "inventory", "acme.yaml"), "w") as f:
        f.write(inventory(n))
    for stem, text in policies(n, p):
        with open(os.path.join(out, stem + ".yaml"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
