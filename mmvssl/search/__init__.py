"""Searching your own videos: the index (store.py, index.py), queries (query.py) and the web page
(server.py, static/). See docs/search.md."""
