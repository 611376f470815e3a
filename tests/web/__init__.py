"""The web faces: the sessions API, streams, the OpenAI face, hostile input, the page."""
