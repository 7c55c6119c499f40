"""Shards, decoding, sampling, tokenisation and the streaming loader."""
