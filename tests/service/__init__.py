"""The conversation service and the AI-server protocols behind it, over real sockets."""
