"""The Textual chat app (``localmed chat``). The core (``localmed``) never imports this."""
