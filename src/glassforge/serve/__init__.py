"""serve: the model behind an OpenAI-compatible HTTP API, a web page, a terminal chat and `generate`.

Top to bottom (each module imports only those below it):

    app.py          create_app (error handlers, the routers) and serve()
    guard.py        what every request passes first: Host allow-list, API key, body size and time, request ids
    routes/         one APIRouter per API: openai, tokenizer, trace, ops
    serving.py      what the routes share: the context check, the one SSE stream, event delivery, the limits
    limits.py       what one request may ask for, and the threads long work runs on, off the event loop
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
