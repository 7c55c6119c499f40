"""Default limits of `mmvssl search` / `mmvssl serve` queries and connections (docs/search.md, Security).

Kept apart from query.py and server.py so the command line can show them without importing torch;
each is a `mmvssl serve` option. The frame / image pixel limit is the decoder's (mmvssl.data.decode.MAX_PIXELS).
"""

MAX_QUERY_SECONDS = 30.0   # longest audio / video query span (an audio query of 180 s took 14.5 s of CPU)
MAX_TEXT_CHARS = 1000      # longest text query (CLIP's context holds ~300 characters; 24,000 letters took 15 s)
MAX_START_SECONDS = 6 * 3600.0  # latest query start: the longest media probe() accepts
MAX_UPLOAD_MB = 50.0       # one query upload, held in memory
MAX_UPLOADS = 4            # uploads held in memory at once
MAX_CONNECTIONS = 64       # connections open at once
TIMEOUT = 30.0             # seconds to receive a request (line, headers, body), and of socket inactivity
