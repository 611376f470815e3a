"""Responses and Conversations: the stateful API that OpenAI's SDKs speak.

``records`` holds what is stored and handed between the layers (a response, a
conversation, a message item, the parsed requests); ``errors`` the two errors
only this API raises. Building and reading the wire shapes is the web face's
business (``sessionbridge.web.openai``); nothing here imports aiohttp itself.
"""
