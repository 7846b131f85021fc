"""Cut OpenAI's OpenAPI document down to the operations glassforge serves, with every schema they reference.

    python tests/openapi/extract.py OPENAPI_JSON > tests/openapi/openai-subset.json

OPENAPI_JSON is `openapi.json` of https://github.com/openai/openai-openapi (MIT licence); the subset in this
folder was cut from its commit named in the subset's `info.x-source`. tests/test_openapi_conformance.py runs
schemathesis against it.
"""

from __future__ import annotations

import json
import sys

SERVED = {"/chat/completions": ["post"], "/completions": ["post"], "/embeddings": ["post"], "/models": ["get"],
          "/models/{model}": ["get"], "/responses": ["post"]}


def refs(node, found: set[str]) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/"):
                found.add(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def subset(doc: dict, source: str) -> dict:
    paths = {p: {m: doc["paths"][p][m] for m in methods} for p, methods in SERVED.items()}
    wanted: set[str] = set()
    refs(paths, wanted)
    done: set[str] = set()
    while wanted - done:
        ref = sorted(wanted - done)[0]
        done.add(ref)
        _, _, kind, name = ref.split("/", 3)
        refs(doc["components"][kind][name], wanted)
    components: dict = {}
    for ref in sorted(done):
        _, _, kind, name = ref.split("/", 3)
        components.setdefault(kind, {})[name] = doc["components"][kind][name]
    info = {**doc["info"], "x-source": source}
    return {"openapi": doc["openapi"], "info": info, "servers": doc.get("servers", []), "paths": paths,
            "components": components}


if __name__ == "__main__":
    path = sys.argv[1]
    source = sys.argv[2] if len(sys.argv) > 2 else path
    json.dump(subset(json.load(open(path)), source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
