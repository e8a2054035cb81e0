"""Generation over any runtime: sampling, the generation loop, and `Model` (load, stream, chat, cancel)."""
