"""Using a trained run: loading, generation, chat, the server, merge and export."""
