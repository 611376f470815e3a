"""The OpenAI face of the bridge: Responses, Conversations and Models, in OpenAI's shapes.

    requests   a request body or query, checked, into a record of ``sessionbridge.responses``
    objects    records into OpenAI's objects (response, conversation, item, list, model)
    stream     a response's stages into its numbered stream events, live or replayed
    sse        those events as Server-Sent Events
    errors     the bridge's errors as OpenAI's error object, and the middleware that sends it

The official ``openai`` Python SDK's types are the judge of every shape here;
the tests validate each object and event against them.
"""
