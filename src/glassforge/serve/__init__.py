"""serve: the model behind an OpenAI-compatible HTTP API, a web page, a terminal chat and `generate`.

Top to bottom (each module imports only those below it):

    app.py          create_app (error handlers, the Guard middleware, the routers) and serve()
    routes/         one APIRouter per API: openai, tokenizer, trace, ops
    serving.py      what the routes share: the context check, the one SSE stream, event delivery
    protocol.py     request bodies (pydantic), error bodies, log-prob shapes
    metrics.py      /metrics in Prometheus's text format
    web.py          the page (static/) and its /facts
    chat.py         `glassforge chat`        generate.py   `glassforge generate`
    engine.py       the scheduler: continuous batching on one thread
    fastpath.py     the prefill and decode kernels, int8, torch.compile and AOT
    text.py         incremental detokenizing, stop strings
    grammar.py      llguidance for response_format JSON
    types.py        SamplingParams, Event, TokenLogprob, QueueFull, ContextTooLong
"""
