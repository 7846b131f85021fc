"""schemathesis hooks for the OpenAI document (tests/test_openapi_conformance.py): requests it generates are
for this server's model, whole rather than streamed (streams are checked event by event in that test), and
short, so the cases reach the model and answer.

`echo` is turned off: with it, completions' log-probs start with null for the prompt's first token, which
nothing predicts. OpenAI's legacy API answered so and lm-evaluation-harness reads it so, but the document
types those entries as numbers (tested on its own in tests/test_serve.py)."""

import os

import schemathesis

LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = os.environ["GLASSFORGE_TEST_MODEL"]
        body["stream"] = False
        body.pop("echo", None)
        for name in LIMITS:
            if isinstance(body.get(name), int) and body[name] > 4:
                body[name] = 4
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
    return body
