"""``localmed serve``: the OpenAI-compatible API over one engine process."""
